// Multi-adapter LoRA ops (SGMV / BGMV) over the paged adapter pool: shared host-side declarations.
//
// Pool layout (lorax_core/adapters/pool.py):
//   arena       [pages, page_size]  one dtype for all adapters
//   page_table  int32 [slots, layers, modules, 2, max_rank, chunks]: the page of chunk c of row j of an
//               adapter's A (ab = 0, rows of length in) or B^T (ab = 1, rows of length out); chunk c holds
//               elements [c * page_size, (c + 1) * page_size) of the row.
//   ranks       int32 [slots, layers, modules] (0: the adapter does not touch that module), scales fp32 [slots]
// Tokens are processed in groups that share one adapter: group g covers token_order[starts[g] : starts[g + 1]]
// (or tokens starts[g] .. starts[g + 1] - 1 when token_order is empty) and uses adapter group_adapters[g]
// (-1: no adapter, the rows are skipped). SGMV's segments are such groups; BGMV builds them by bucketing tokens by
// adapter (each backend has its own `Group` function), so each distinct adapter's weights are read once per call
// (on CUDA, up to kPerTokenMaxTokens tokens are a group each, and L2 serves an adapter's weights after the first).
// Shrink writes every element of v (zeros past an adapter's rank and for rows without one), so v needs no
// initialization; expand updates y in place and accepts y with a row stride (a column slice of a fused output).
// One call serves the modules of a fused projection (q, k, v or gate, up), which share their input x: v is
// [tokens, modules * max_rank] (module i's rows at columns [i * max_rank, (i + 1) * max_rank)), and module i's
// delta goes to y's columns [columns[i], columns[i + 1]).
#pragma once
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace lorax::lora {

constexpr size_t kMaxModules = 4;  // modules per call: a fused projection has at most three (q, k, v)

struct PoolView {
  at::Tensor arena, page_table, ranks;
  int64_t layer;
  std::vector<int64_t> modules;
  int64_t page_size;
};

struct Groups {
  at::Tensor starts, adapters, order;  // order may be undefined (identity)
};

// The pool's tensors, the layer and modules; dims[i]: module i's row length (in for A, out for B^T: ab = 0 / 1).
void check_pool(const PoolView& p, const std::vector<int64_t>& dims, int64_t ab, const char* op);
// Activations [tokens, dim] with the arena's dtype and device; for expand also v fp32 [tokens, modules *
// max_rank], scales fp32 [slots] and the column offsets [modules + 1] within y.
void check_activations(const at::Tensor& act, const PoolView& p, const char* op);
void check_expand_inputs(const at::Tensor& y, const at::Tensor& v, const at::Tensor& scales, const PoolView& p,
                         const std::vector<int64_t>& columns, const char* op);
// All of check_expand_inputs but v.
void check_expand_target(const at::Tensor& y, const at::Tensor& scales, const PoolView& p,
                         const std::vector<int64_t>& columns, const char* op);
// Its parts for a y of `width` columns that is not there yet (the NF4 GEMV's epilogue): columns, the pool's B side
// and scales; v of `tokens` rows.
void check_expand_pool(const at::Tensor& scales, const PoolView& p, const std::vector<int64_t>& columns,
                       int64_t width, const char* op);
void check_shrunk(const at::Tensor& v, int64_t tokens, const PoolView& p, const char* op);
// SGMV's segments as groups. Their values are checked by the CPU kernels (starts rising from >= 0 to at most the
// tokens, adapters in [-1, slots)); a check on the GPU would wait for the device, so the CUDA kernels clamp instead:
// rows outside [0, tokens) are never touched and an adapter outside the pool counts as none.
Groups groups_from_segments(const at::Tensor& seg_starts, const at::Tensor& seg_adapters);
Groups groups_from_indices(const at::Tensor& adapter_indices, int64_t slots);  // ATen ops (the CPU's)

}  // namespace lorax::lora

// ---- the ops, written once for every backend: `Shrink` / `Expand` are the backend's kernels ----------------
namespace lorax::lora {

using ShrinkKernel = void (*)(const at::Tensor& x, const PoolView& p, const Groups& g, at::Tensor& v);
using ExpandKernel = void (*)(at::Tensor& y, const at::Tensor& v, const PoolView& p, const at::Tensor& scales,
                              const Groups& g, const std::vector<int64_t>& columns);
using GroupFn = Groups (*)(const at::Tensor& adapter_indices, int64_t slots);
// Shrink and expand in one kernel, where the backend has one for this call: returns whether it ran (x contiguous).
using ApplyKernel = bool (*)(at::Tensor& y, const at::Tensor& x, const PoolView& p, const at::Tensor& scales,
                             const Groups& g, const std::vector<int64_t>& columns);

inline void check_shrink_input(const at::Tensor& x, const PoolView& p, const char* op) {
  check_activations(x, p, op);
  check_pool(p, std::vector<int64_t>(p.modules.size(), x.size(1)), 0, op);
}

// shrink's output for x [T, in]: v [T, modules * max_rank] fp32, uninitialised.
inline at::Tensor shrink_output(const at::Tensor& x, const PoolView& p) {
  return at::empty({x.size(0), static_cast<int64_t>(p.modules.size()) * p.page_table.size(4)},
                   x.options().dtype(at::kFloat));
}

// Checks x [T, in] against the pool and returns shrink's output.
inline at::Tensor checked_shrink_output(const at::Tensor& x, const PoolView& p, const char* op) {
  check_shrink_input(x, p, op);
  return shrink_output(x, p);
}

inline void check_indices(const at::Tensor& adapter_indices, int64_t tokens, const char* op) {
  TORCH_CHECK(adapter_indices.numel() == tokens, op, ": ", adapter_indices.numel(), " adapter indices for ", tokens,
              " tokens");
}

template <ShrinkKernel Shrink>
at::Tensor sgmv_shrink(const at::Tensor& x, const at::Tensor& arena, const at::Tensor& page_table,
                       const at::Tensor& ranks, const at::Tensor& seg_starts, const at::Tensor& seg_adapters,
                       int64_t layer, at::IntArrayRef modules, int64_t page_size) {
  PoolView p{arena, page_table, ranks, layer, modules.vec(), page_size};
  at::Tensor v = checked_shrink_output(x, p, "sgmv_shrink");
  Shrink(x.contiguous(), p, groups_from_segments(seg_starts, seg_adapters), v);
  return v;
}

template <ShrinkKernel Shrink, GroupFn Group>
at::Tensor bgmv_shrink(const at::Tensor& x, const at::Tensor& arena, const at::Tensor& page_table,
                       const at::Tensor& ranks, const at::Tensor& adapter_indices, int64_t layer,
                       at::IntArrayRef modules, int64_t page_size) {
  PoolView p{arena, page_table, ranks, layer, modules.vec(), page_size};
  at::Tensor v = checked_shrink_output(x, p, "bgmv_shrink");
  check_indices(adapter_indices, x.size(0), "bgmv_shrink");
  Shrink(x.contiguous(), p, Group(adapter_indices, page_table.size(0)), v);
  return v;
}

template <ExpandKernel Expand>
void sgmv_expand(at::Tensor& y, const at::Tensor& v, const at::Tensor& arena, const at::Tensor& page_table,
                 const at::Tensor& ranks, const at::Tensor& scales, const at::Tensor& seg_starts,
                 const at::Tensor& seg_adapters, int64_t layer, at::IntArrayRef modules, at::IntArrayRef columns,
                 int64_t page_size) {
  PoolView p{arena, page_table, ranks, layer, modules.vec(), page_size};
  check_expand_inputs(y, v, scales, p, columns.vec(), "sgmv_expand");
  Expand(y, v.contiguous(), p, scales.contiguous(), groups_from_segments(seg_starts, seg_adapters), columns.vec());
}

template <ExpandKernel Expand, GroupFn Group>
void bgmv_expand(at::Tensor& y, const at::Tensor& v, const at::Tensor& arena, const at::Tensor& page_table,
                 const at::Tensor& ranks, const at::Tensor& scales, const at::Tensor& adapter_indices,
                 int64_t layer, at::IntArrayRef modules, at::IntArrayRef columns, int64_t page_size) {
  PoolView p{arena, page_table, ranks, layer, modules.vec(), page_size};
  check_expand_inputs(y, v, scales, p, columns.vec(), "bgmv_expand");
  check_indices(adapter_indices, y.size(0), "bgmv_expand");
  Expand(y, v.contiguous(), p, scales.contiguous(), Group(adapter_indices, page_table.size(0)), columns.vec());
}

// Shrink and expand in one op: v is internal, and BGMV groups its tokens once for both kernels. Where the backend
// has one kernel for both (Apply, not null) and it serves the call, that runs instead.
template <ShrinkKernel Shrink, ExpandKernel Expand, ApplyKernel Apply>
void apply_lora(at::Tensor& y, const at::Tensor& x, const PoolView& p, const at::Tensor& scales, const Groups& g,
                const std::vector<int64_t>& columns, const char* op) {
  check_shrink_input(x, p, op);
  TORCH_CHECK(y.dim() == 2 && y.size(0) == x.size(0), op, ": y must have x's ", x.size(0), " rows, got ",
              y.sizes());
  check_expand_target(y, scales, p, columns, op);
  const at::Tensor xc = x.contiguous(), sc = scales.contiguous();
  if constexpr (Apply != nullptr) {
    if (Apply(y, xc, p, sc, g, columns)) return;
  }
  at::Tensor v = shrink_output(x, p);
  Shrink(xc, p, g, v);
  Expand(y, v, p, sc, g, columns);
}

template <ShrinkKernel Shrink, ExpandKernel Expand, ApplyKernel Apply>
void sgmv(at::Tensor& y, const at::Tensor& x, const at::Tensor& arena, const at::Tensor& page_table,
          const at::Tensor& ranks, const at::Tensor& scales, const at::Tensor& seg_starts,
          const at::Tensor& seg_adapters, int64_t layer, at::IntArrayRef modules, at::IntArrayRef columns,
          int64_t page_size) {
  PoolView p{arena, page_table, ranks, layer, modules.vec(), page_size};
  apply_lora<Shrink, Expand, Apply>(y, x, p, scales, groups_from_segments(seg_starts, seg_adapters), columns.vec(),
                                    "sgmv");
}

template <ShrinkKernel Shrink, ExpandKernel Expand, ApplyKernel Apply, GroupFn Group>
void bgmv(at::Tensor& y, const at::Tensor& x, const at::Tensor& arena, const at::Tensor& page_table,
          const at::Tensor& ranks, const at::Tensor& scales, const at::Tensor& adapter_indices, int64_t layer,
          at::IntArrayRef modules, at::IntArrayRef columns, int64_t page_size) {
  PoolView p{arena, page_table, ranks, layer, modules.vec(), page_size};
  check_indices(adapter_indices, x.size(0), "bgmv");
  apply_lora<Shrink, Expand, Apply>(y, x, p, scales, Group(adapter_indices, page_table.size(0)), columns.vec(),
                                    "bgmv");
}

// add_rms_norm then sgmv_shrink through the dispatcher (lora_common.cpp): the CPU's kernel, and CUDA's beyond one row.
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_sgmv_shrink_composite(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps, const at::Tensor& arena,
    const at::Tensor& page_table, const at::Tensor& ranks, const at::Tensor& seg_starts,
    const at::Tensor& seg_adapters, int64_t layer, at::IntArrayRef modules, int64_t page_size);

// apply: the backend's ApplyKernel, or nullptr.
#define LORAX_REGISTER_LORA_OPS(m, shrink, expand, apply, group)           \
  m.impl("sgmv_shrink", &lorax::lora::sgmv_shrink<shrink>);               \
  m.impl("bgmv_shrink", &lorax::lora::bgmv_shrink<shrink, group>);        \
  m.impl("sgmv_expand", &lorax::lora::sgmv_expand<expand>);               \
  m.impl("bgmv_expand", &lorax::lora::bgmv_expand<expand, group>);        \
  m.impl("sgmv", &lorax::lora::sgmv<shrink, expand, apply>);              \
  m.impl("bgmv", &lorax::lora::bgmv<shrink, expand, apply, group>)

}  // namespace lorax::lora

// SGMV / BGMV on CUDA: tensors to raw pointers; kernels in lora_kernels.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#define LORAX_DTYPE_FROM_ATEN
#include "common/dtype.h"

#include "common/checks.h"
#include "layers/layers.h"
#include "lora/lora.h"
#include "lora/lora_cuda.h"
#include "lora/lora_cuda_args.h"

namespace lorax::lora {
namespace {

cuda::TokenGroups group_args(const Groups& g, int64_t tokens) {
  return {g.starts.defined() ? g.starts.data_ptr<int32_t>() : nullptr, g.adapters.data_ptr<int32_t>(),
          g.order.defined() ? g.order.data_ptr<int32_t>() : nullptr, g.adapters.numel(), tokens};
}

void check_groups(const Groups& g, const at::Tensor& act, int64_t max_rank, const char* op) {
  TORCH_CHECK((!g.starts.defined() || g.starts.device() == act.device()) && g.adapters.device() == act.device(), op,
              ": the segments / adapter indices are on ", g.adapters.device(), ", the activations on ", act.device());
  // Token positions are int32; the expand tile's v must fit in 48 KB of shared memory.
  TORCH_CHECK(act.size(0) <= std::numeric_limits<int32_t>::max(), op, " (CUDA): ", act.size(0),
              " tokens in one call; at most 2^31 - 1");
  TORCH_CHECK(max_rank <= 1024, op, " (CUDA): the pool's max rank ", max_rank, " exceeds 1024");
}

void shrink_kernel(const at::Tensor& x, const PoolView& p, const Groups& g, at::Tensor& v) {
  const int64_t max_rank = p.page_table.size(4);
  check_groups(g, x, max_rank, "lora shrink");
  c10::cuda::CUDAGuard guard(x.device());
  cuda::shrink(x.data_ptr(), lorax::kernel_dtype(x.scalar_type(), "lora"), x.size(0), x.size(1), pool_args(p),
               module_args(p, {}), group_args(g, x.size(0)), v.data_ptr<float>(), max_rank,
               at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void expand_kernel(at::Tensor& y, const at::Tensor& v, const PoolView& p, const at::Tensor& scales, const Groups& g,
                   const std::vector<int64_t>& columns) {
  const int64_t max_rank = p.page_table.size(4);
  check_groups(g, y, max_rank, "lora expand");
  c10::cuda::CUDAGuard guard(y.device());
  cuda::expand(y.data_ptr(), lorax::kernel_dtype(y.scalar_type(), "lora"), y.size(0), y.stride(0),
               v.data_ptr<float>(), max_rank, pool_args(p), module_args(p, columns), scales.data_ptr<float>(),
               group_args(g, y.size(0)), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool apply_kernel(at::Tensor& y, const at::Tensor& x, const PoolView& p, const at::Tensor& scales, const Groups& g,
                  const std::vector<int64_t>& columns) {
  const int64_t max_rank = p.page_table.size(4);
  check_groups(g, x, max_rank, "lora");
  c10::cuda::CUDAGuard guard(x.device());
  const bool ran = cuda::apply(y.data_ptr(), lorax::kernel_dtype(y.scalar_type(), "lora"), y.size(0), y.stride(0),
                               x.data_ptr(), x.size(1), pool_args(p), module_args(p, columns),
                               scales.data_ptr<float>(), group_args(g, x.size(0)), max_rank,
                               at::cuda::getCurrentDeviceProperties()->multiProcessorCount,
                               at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ran;
}

// BGMV's tokens bucketed by adapter on the GPU in one kernel (the CPU's version is a handful of ATen ops); up to
// kPerTokenMaxTokens tokens, one group per token and no kernel (the indices are the groups' adapters).
Groups group_kernel(const at::Tensor& adapter_indices, int64_t slots) {
  TORCH_CHECK(adapter_indices.is_cuda(), "bgmv (CUDA): adapter_indices must be on the GPU, got ",
              adapter_indices.device());
  const at::Tensor indices = adapter_indices.reshape({-1}).to(at::kInt).contiguous();
  if (indices.numel() <= cuda::kPerTokenMaxTokens) return {at::Tensor(), indices, at::Tensor()};
  TORCH_CHECK(slots + 1 <= 6000, "bgmv (CUDA): ", slots, " pool slots; at most 5999");
  const auto options = indices.options();
  at::Tensor starts = at::empty({slots + 2}, options), adapters = at::empty({slots + 1}, options);
  at::Tensor order = at::empty({indices.numel()}, options);
  c10::cuda::CUDAGuard guard(indices.device());
  cuda::group_by_adapter(indices.data_ptr<int32_t>(), indices.numel(), slots, starts.data_ptr<int32_t>(),
                         adapters.data_ptr<int32_t>(), order.data_ptr<int32_t>(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {starts, adapters, order};
}

// One row (x [1, cols] bf16 / fp16, cols * 4 bytes fitting the default shared memory): one kernel; else the ops.
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_sgmv_shrink_cuda(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps, const at::Tensor& arena,
    const at::Tensor& page_table, const at::Tensor& ranks, const at::Tensor& seg_starts,
    const at::Tensor& seg_adapters, int64_t layer, at::IntArrayRef modules, int64_t page_size) {
  const bool half = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  if (x.dim() != 2 || x.size(0) != 1 || !half || x.size(1) * 4 > 48 * 1024)
    return add_rms_norm_sgmv_shrink_composite(x, residual, weight, eps, arena, page_table, ranks, seg_starts,
                                              seg_adapters, layer, modules, page_size);
  layers::check_add_rms_norm(x, residual, weight);
  PoolView p{arena, page_table, ranks, layer, modules.vec(), page_size};
  check_activations(x, p, "add_rms_norm_sgmv_shrink");
  check_pool(p, std::vector<int64_t>(p.modules.size(), x.size(1)), 0, "add_rms_norm_sgmv_shrink");
  const Groups g = groups_from_segments(seg_starts, seg_adapters);
  check_groups(g, x, page_table.size(4), "add_rms_norm_sgmv_shrink");
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), rc = residual.contiguous(), wc = weight.contiguous();
  at::Tensor out = at::empty_like(xc), sum = at::empty_like(xc);
  const int64_t max_rank = page_table.size(4);
  at::Tensor v = at::empty({1, static_cast<int64_t>(modules.size()) * max_rank}, x.options().dtype(at::kFloat));
  cuda::norm_shrink(xc.data_ptr(), rc.data_ptr(), wc.data_ptr(), x.size(1), static_cast<float>(eps), out.data_ptr(),
                    sum.data_ptr(), lorax::kernel_dtype(x.scalar_type(), "lora"), pool_args(p), module_args(p, {}),
                    group_args(g, 1), v.data_ptr<float>(), max_rank, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, sum, v};
}

}  // namespace

TORCH_LIBRARY_IMPL(lorax_core, CUDA, m) {
  LORAX_REGISTER_LORA_OPS(m, shrink_kernel, expand_kernel, apply_kernel, group_kernel);
  m.impl("add_rms_norm_sgmv_shrink", &add_rms_norm_sgmv_shrink_cuda);
}

}  // namespace lorax::lora

// SGMV / BGMV on CUDA: tensors to raw pointers; kernels in lora_kernels.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#define LORAX_DTYPE_FROM_ATEN
#include "common/dtype.h"

#include "common/checks.h"
#include "lora/lora.h"
#include "lora/lora_cuda.h"

namespace lorax::lora {
namespace {

cuda::Pool pool_args(const PoolView& p) {
  const auto s = p.page_table.sizes();
  return {p.arena.data_ptr(), p.page_table.data_ptr<int32_t>(), p.ranks.data_ptr<int32_t>(), s[1], s[2], s[4], s[5],
          p.layer, p.module, log2_exact(p.page_size, "lora (CUDA): page_size")};
}

cuda::TokenGroups group_args(const Groups& g) {
  return {g.starts.data_ptr<int32_t>(), g.adapters.data_ptr<int32_t>(),
          g.order.defined() ? g.order.data_ptr<int32_t>() : nullptr, g.adapters.numel()};
}

void shrink_kernel(const at::Tensor& x, const PoolView& p, const Groups& g, at::Tensor& v) {
  c10::cuda::CUDAGuard guard(x.device());
  cuda::shrink(x.data_ptr(), lorax::kernel_dtype(x.scalar_type(), "lora"), x.size(0), x.size(1), pool_args(p),
               group_args(g), v.data_ptr<float>(), v.size(1), at::cuda::getCurrentCUDAStream());
}

void expand_kernel(at::Tensor& y, const at::Tensor& v, const PoolView& p, const at::Tensor& scales,
                   const Groups& g) {
  c10::cuda::CUDAGuard guard(y.device());
  cuda::expand(y.data_ptr(), lorax::kernel_dtype(y.scalar_type(), "lora"), y.size(0), y.size(1),
               v.data_ptr<float>(), v.size(1), pool_args(p), scales.data_ptr<float>(), group_args(g),
               at::cuda::getCurrentCUDAStream());
}

}  // namespace

TORCH_LIBRARY_IMPL(lorax_core, CUDA, m) { LORAX_REGISTER_LORA_OPS(m, shrink_kernel, expand_kernel); }

}  // namespace lorax::lora

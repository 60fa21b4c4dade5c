// Fused layer ops on CUDA: checks and tensors to raw pointers; kernels in layers_kernels.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#define LORAX_DTYPE_FROM_ATEN
#include "common/dtype.h"

#include "layers/layers.h"
#include "layers/layers_cuda.h"

namespace lorax::layers {
namespace {

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const Rows r = check_rms_norm(x, weight, "rms_norm");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({r.rows, r.cols}, x.options());
  cuda::rms_norm(x.const_data_ptr(), x.stride(0), nullptr, 0, weight.const_data_ptr(), out.data_ptr(), nullptr, r.rows,
                 r.cols, static_cast<float>(eps), kernel_dtype(x.scalar_type(), "rms_norm"),
                 at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps) {
  const Rows r = check_add_rms_norm(x, residual, weight);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({r.rows, r.cols}, x.options()), sum = at::empty({r.rows, r.cols}, x.options());
  cuda::rms_norm(x.const_data_ptr(), x.stride(0), residual.const_data_ptr(), residual.stride(0),
                 weight.const_data_ptr(), out.data_ptr(), sum.data_ptr(), r.rows, r.cols, static_cast<float>(eps),
                 kernel_dtype(x.scalar_type(), "add_rms_norm"), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, sum};
}

void launch_rotary(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                   const at::Tensor& positions, const RotaryShape& r, const cuda::KvWrite& kv, const char* op) {
  const at::Tensor pos = positions.contiguous();
  cuda::rotary_embedding({q.data_ptr(), r.q_heads, q.stride(0), q.stride(1)},
                         {k.data_ptr(), r.k_heads, k.stride(0), k.stride(1)}, cos.const_data_ptr(),
                         sin.const_data_ptr(), pos.const_data_ptr<int64_t>(), r.tokens, r.head_dim, kv,
                         kernel_dtype(q.scalar_type(), op), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Positions outside the tables are not checked on CUDA (that needs a device sync); they read out of bounds.
void rotary_embedding_cuda(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                           const at::Tensor& positions) {
  const RotaryShape r = check_rotary(q, k, cos, sin, positions);
  c10::cuda::CUDAGuard guard(q.device());
  launch_rotary(q, k, cos, sin, positions, r, {}, "rotary_embedding");
}

// Nor are slots outside the cache (as in kv_cache_write): they write out of bounds.
void rotary_kv_cache_write_cuda(at::Tensor& q, at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                                const at::Tensor& sin, const at::Tensor& positions, at::Tensor& k_cache,
                                at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  const RotaryShape r = check_rotary_kv_cache_write(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping);
  c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor slots = slot_mapping.contiguous();
  const cuda::KvWrite kv{k_cache.data_ptr(), v_cache.data_ptr(), slots.const_data_ptr<int64_t>(),
                         {const_cast<void*>(v.const_data_ptr()), r.k_heads, v.stride(0), v.stride(1)}};
  launch_rotary(q, k, cos, sin, positions, r, kv, "rotary_kv_cache_write");
}

at::Tensor silu_mul_cuda(const at::Tensor& gate, const at::Tensor& up) {
  const Rows r = check_silu_mul(gate, up);
  c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor out = at::empty({r.rows, r.cols}, gate.options());
  cuda::silu_mul(gate.const_data_ptr(), gate.stride(0), up.const_data_ptr(), up.stride(0), out.data_ptr(), r.rows,
                 r.cols, kernel_dtype(gate.scalar_type(), "silu_mul"), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lorax_core, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("add_rms_norm", &add_rms_norm_cuda);
  m.impl("rotary_embedding", &rotary_embedding_cuda);
  m.impl("rotary_kv_cache_write", &rotary_kv_cache_write_cuda);
  m.impl("silu_mul", &silu_mul_cuda);
}

}  // namespace lorax::layers

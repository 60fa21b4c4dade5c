// NF4 ops on CUDA: tensor checks and allocation here, kernels in nf4_kernels.cu.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#define LORAX_DTYPE_FROM_ATEN
#include "common/dtype.h"

#include "common/checks.h"
#include "layers/layers.h"
#include "lora/lora.h"
#include "lora/lora_cuda_args.h"
#include "nf4/nf4.h"
#include "nf4/nf4_cuda.h"

namespace lorax::nf4 {
namespace {

// A tensor the vectorized kernels may read with 16-byte loads.
at::Tensor aligned16(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

// Tensors kept alive for the kernel's view of the absmax.
struct AbsmaxHold {
  at::Tensor absmax, code2, absmax2;
  cuda::AbsmaxArgs args;
};

AbsmaxHold absmax_args(const at::Tensor& codes, const AbsmaxState& s) {
  CHECK_SAME_DEVICE(codes, s.absmax);
  AbsmaxHold h;
  h.absmax = s.absmax.contiguous();
  h.args.absmax = h.absmax.data_ptr();
  if (s.nested()) {
    CHECK_DTYPE(s.absmax, at::kByte);  // [blocks] 8-bit codes of the absmax
    h.code2 = s.code2->to(at::kFloat).contiguous();
    h.absmax2 = s.absmax2->to(at::kFloat).contiguous();
    h.args.code2 = h.code2.data_ptr<float>();
    h.args.absmax2 = h.absmax2.data_ptr<float>();
    h.args.blocksize2_log2 = log2_exact(s.blocksize2, "nf4 (CUDA): nested_blocksize");
    h.args.offsets[0] = static_cast<float>(s.offset);
    for (size_t j = 0; j < s.part_starts.size(); ++j) {  // make_absmax_state checked: at most kMaxAbsmaxParts
      h.args.part_groups[j] = static_cast<uint32_t>(s.part_starts[j] / s.blocksize2);
      h.args.offsets[j + 1] = static_cast<float>(s.part_offsets[j]);
    }
  } else {
    CHECK_DTYPE(s.absmax, at::kFloat);  // [blocks]
  }
  return h;
}

std::tuple<at::Tensor, at::Tensor> quantize_cuda(const at::Tensor& x, int64_t blocksize) {
  check_blocksize(blocksize);
  CHECK_FLOAT_INPUT(x);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xf = x.contiguous().to(at::kFloat).reshape({-1});
  const int64_t n = xf.numel();
  TORCH_CHECK(n > 0, "nf4_quantize: cannot quantize an empty tensor");
  at::Tensor codes = at::empty({(n + 1) / 2}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({(n + blocksize - 1) / blocksize}, x.options().dtype(at::kFloat));
  cuda::quantize(xf.data_ptr<float>(), n, log2_exact(blocksize, "nf4 (CUDA): blocksize"),
                 codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, absmax};
}

std::tuple<at::Tensor, at::Tensor> quantize_absmax_cuda(const at::Tensor& absmax, const at::Tensor& code,
                                                        int64_t blocksize) {
  check_quantize_absmax_args(absmax, code, blocksize);
  c10::cuda::CUDAGuard guard(absmax.device());
  at::Tensor a = absmax.contiguous().reshape({-1});
  at::Tensor c = code.contiguous();
  const int64_t n = a.numel();
  at::Tensor q = at::empty({n}, a.options().dtype(at::kByte));
  at::Tensor absmax2 = at::empty({(n + blocksize - 1) / blocksize}, a.options());
  if (n > 0) {
    cuda::quantize_absmax(a.data_ptr<float>(), n, c.data_ptr<float>(), blocksize, q.data_ptr<uint8_t>(),
                          absmax2.data_ptr<float>(), at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {q, absmax2};
}

at::Tensor dequantize_absmax_cuda(const at::Tensor& qabsmax, const at::Tensor& code2, const at::Tensor& absmax2,
                                  double offset, int64_t blocksize2, LORAX_NF4_PARTS_PARAMS) {
  c10::cuda::CUDAGuard guard(qabsmax.device());
  AbsmaxHold h =
      absmax_args(qabsmax, make_absmax_state(qabsmax, code2, absmax2, offset, blocksize2, part_starts, part_offsets));
  at::Tensor out = at::empty({qabsmax.numel()}, qabsmax.options().dtype(at::kFloat));
  if (out.numel() > 0) {
    cuda::dequantize_absmax(h.args, out.numel(), out.data_ptr<float>(), at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

at::Tensor dequantize_impl(const at::Tensor& codes, const AbsmaxHold& h, int64_t blocksize, int64_t numel,
                           at::ScalarType dtype) {
  check_nf4_sizes("nf4_dequantize", codes, h.absmax.numel(), blocksize, numel);
  at::Tensor c = aligned16(codes);
  at::Tensor out = at::empty({numel}, codes.options().dtype(dtype));
  if (numel > 0) {
    cuda::dequantize(c.data_ptr<uint8_t>(), h.args, log2_exact(blocksize, "nf4 (CUDA): blocksize"), numel,
                     lorax::kernel_dtype(dtype, "nf4"), out.data_ptr(), at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

at::Tensor dequantize_cuda(const at::Tensor& codes, const at::Tensor& absmax, const std::optional<at::Tensor>& code2,
                           const std::optional<at::Tensor>& absmax2, double offset, int64_t blocksize,
                           int64_t blocksize2, at::IntArrayRef shape, at::ScalarType dtype, LORAX_NF4_PARTS_PARAMS) {
  c10::cuda::CUDAGuard guard(codes.device());
  AbsmaxHold h = absmax_args(codes, LORAX_NF4_ABSMAX_STATE);
  return dequantize_impl(codes, h, blocksize, c10::multiply_integers(shape), dtype).reshape(shape);
}

// The bias [N] in x's dtype, contiguous, for the kernels (none: none).
std::optional<at::Tensor> checked_bias(const at::Tensor& x, const std::optional<at::Tensor>& bias, int64_t N,
                                       const char* op) {
  if (!bias) return std::nullopt;
  CHECK_SAME_DEVICE(x, *bias);
  TORCH_CHECK(bias->numel() == N, op, ": bias has ", bias->numel(), " values, expected ", N);
  return bias->to(x.scalar_type()).contiguous();
}

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax,
                       const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& absmax2, double offset,
                       int64_t blocksize, int64_t blocksize2, int64_t out_features,
                       const std::optional<at::Tensor>& bias, LORAX_NF4_PARTS_PARAMS) {
  CHECK_FLOAT_INPUT(x);  // [..., in]
  CHECK_SAME_DEVICE(x, codes);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = x.size(-1), N = out_features, M = K > 0 ? x.numel() / K : 0;
  AbsmaxHold h = absmax_args(codes, LORAX_NF4_ABSMAX_STATE);
  const cuda::DType dt = lorax::kernel_dtype(x.scalar_type(), "nf4");
  if (!cuda::gemm_supported(M, N, K, dt)) {  // large M, fp32 or odd shapes: dequantize once, then cuBLAS
    at::Tensor w = dequantize_impl(codes, h, blocksize, N * K, x.scalar_type()).reshape({N, K});
    return at::linear(x, w, bias);
  }
  check_nf4_sizes("nf4_linear", codes, h.absmax.numel(), blocksize, N * K);
  at::Tensor xc = aligned16(x);
  at::Tensor c = aligned16(codes);
  const std::optional<at::Tensor> b = checked_bias(x, bias, N, "nf4_linear");
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  at::Tensor ws = at::empty({cuda::gemm_workspace_floats(M, N, K, num_sms)}, x.options().dtype(at::kFloat));
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(N);
  at::Tensor y = at::empty(out_shape, x.options());
  cuda::gemm(xc.data_ptr(), dt, M, K, c.data_ptr<uint8_t>(), h.args, log2_exact(blocksize, "nf4 (CUDA): blocksize"),
             N, b ? b->data_ptr() : nullptr, ws.data_ptr<float>(), num_sms, y.data_ptr(),
             at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

// Whether the GEMV serves nf4_linear_sgmv(_rotary) of x: up to kGemvMaxM rows of x in fp16 / bf16, a shape it
// supports, and a pool in x's dtype.
bool gemv_serves(const at::Tensor& x, int64_t N, const LoraArgs& l) {
  const int64_t K = x.size(-1), M = K > 0 ? x.numel() / K : 0;
  const bool half_dtype = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  return M <= cuda::kGemvMaxM && half_dtype &&  // gemm_supported also refuses M < 1
         cuda::gemm_supported(M, N, K, lorax::kernel_dtype(x.scalar_type(), "nf4")) &&
         (!l.given() || l.arena->scalar_type() == x.scalar_type());
}

// The fused path of nf4_linear_sgmv(_rotary) (gemv_serves): the LoRA shrink (the sgmv_shrink op: one kernel; none
// when v is given), then the GEMV with the expand, bias and silu_mul or the rotary and cache write in its epilogue,
// into y [rows, N / 2 with silu_mul, else N].
void linear_sgmv_gemv(const at::Tensor& x, const at::Tensor& codes, const AbsmaxState& s, int64_t blocksize, int64_t N,
                      const std::optional<at::Tensor>& bias, const LoraArgs& l, bool silu_mul,
                      const cuda::GemvRope* rope, const cuda::GemvShrink* shrink, at::Tensor& y) {
  const int64_t K = x.size(-1), M = x.numel() / K;
  CHECK_SAME_DEVICE(x, codes);
  c10::cuda::CUDAGuard guard(x.device());
  AbsmaxHold h = absmax_args(codes, s);
  check_nf4_sizes("nf4_linear_sgmv", codes, h.absmax.numel(), blocksize, N * K);
  at::Tensor xc = aligned16(x);
  at::Tensor c = aligned16(codes);
  const std::optional<at::Tensor> b = checked_bias(x, bias, N, "nf4_linear_sgmv");
  at::Tensor shrunk, scale_t, starts, slots;  // kept alive for the kernels
  cuda::GemvLora lora{};
  if (l.given()) {
    const lora::PoolView pv{*l.arena, *l.page_table, *l.ranks, l.layer, l.modules, l.page_size};
    lora::check_activations(x, pv, "nf4_linear_sgmv");
    lora::check_expand_pool(*l.scales, pv, l.columns, N, "nf4_linear_sgmv");
    scale_t = l.scales->contiguous();
    const lora::Groups g = lora::groups_from_segments(*l.seg_starts, *l.seg_slots);
    starts = g.starts;
    slots = g.adapters;
    CHECK_SAME_DEVICE(x, starts);
    CHECK_SAME_DEVICE(x, slots);
    if (l.v) {
      lora::check_shrunk(*l.v, M, pv, "nf4_linear_sgmv");
      shrunk = l.v->contiguous();
    } else {
      static auto shrink = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("lorax_core::sgmv_shrink", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                                 at::IntArrayRef, int64_t)>();
      // checks x against the pool (A's side); one kernel
      shrunk = shrink.call(xc, *l.arena, *l.page_table, *l.ranks, starts, slots, l.layer, l.modules, l.page_size);
    }
    lora = {lora::pool_args(pv), lora::module_args(pv, l.columns), shrunk.data_ptr<float>(), shrunk.size(1),
            l.page_table->size(4), scale_t.data_ptr<float>(), starts.data_ptr<int32_t>(), slots.data_ptr<int32_t>(),
            slots.numel()};
  }
  cuda::gemv(xc.data_ptr(), lorax::kernel_dtype(x.scalar_type(), "nf4"), M, K, c.data_ptr<uint8_t>(), h.args,
             log2_exact(blocksize, "nf4 (CUDA): blocksize"), N, b ? b->data_ptr() : nullptr,
             l.given() ? &lora : nullptr, silu_mul, rope, shrink, y.data_ptr(),
             at::cuda::getCurrentDeviceProperties()->multiProcessorCount, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor linear_sgmv_cuda(LORAX_NF4_LINEAR_SGMV_PARAMS) {
  const LoraArgs l = LORAX_NF4_LINEAR_SGMV_LORA;
  check_linear_sgmv(x, out_features, l, silu_mul);
  const AbsmaxState s = LORAX_NF4_ABSMAX_STATE;
  if (!gemv_serves(x, out_features, l))
    return linear_sgmv_composite(x, codes, s, blocksize, out_features, bias, l, silu_mul);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(silu_mul ? out_features / 2 : out_features);
  at::Tensor y = at::empty(out_shape, x.options());
  linear_sgmv_gemv(x, codes, s, blocksize, out_features, bias, l, silu_mul, nullptr, nullptr, y);
  return y;
}

// The GEMV's epilogue shrinks its SwiGLU output for the next projection (GemvShrink) where the GEMV serves the call
// (gemv_serves), one next module, counters to count its CTAs in, pages of at least 8 elements and a max rank of at
// most kGemvShrinkMaxRank; otherwise nf4_linear_sgmv, then sgmv_shrink.
std::tuple<at::Tensor, at::Tensor> linear_sgmv_silu_shrink_cuda(LORAX_NF4_LINEAR_SGMV_SILU_SHRINK_PARAMS) {
  const LoraArgs l = LORAX_NF4_LINEAR_SGMV_LORA;
  check_linear_sgmv(x, out_features, l, true);
  check_silu_shrink(x, l, next_modules, counters);
  const AbsmaxState s = LORAX_NF4_ABSMAX_STATE;
  const bool fused = gemv_serves(x, out_features, l) && counters && next_modules.size() == 1 && page_size >= 8 &&
                     l.page_table->dim() == 6 && l.page_table->size(4) <= cuda::kGemvShrinkMaxRank &&
                     reinterpret_cast<uintptr_t>(l.arena->data_ptr()) % 16 == 0;
  if (!fused)
    return linear_sgmv_silu_shrink_composite(x, codes, s, blocksize, out_features, bias, l, next_modules);
  const int64_t M = x.size(0), half = out_features / 2;
  const lora::PoolView next{*l.arena, *l.page_table, *l.ranks, l.layer, next_modules.vec(), l.page_size};
  lora::check_pool(next, {half}, 0, "nf4_linear_sgmv_silu_shrink");  // its A rows read the outputs
  const int64_t R = l.page_table->size(4);
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  at::Tensor y = at::empty({M, half}, x.options());
  at::Tensor v_next = at::empty({M, R}, x.options().dtype(at::kFloat));
  at::Tensor partials = at::empty({int64_t{num_sms} * cuda::kGemvMaxCtasPerSm, M * R}, v_next.options());
  const cuda::GemvShrink shrink{lora::pool_args(next), v_next.data_ptr<float>(), partials.data_ptr<float>(),
                                counters->data_ptr<int32_t>()};
  linear_sgmv_gemv(x, codes, s, blocksize, out_features, bias, l, true, nullptr, &shrink, y);
  return {y, v_next};
}

// The GEMV's epilogue rotates and caches when head_dim is a power of two of at least 16 (a tile pairs 8 rows of a
// head's first half with their partners; the kernel finds heads by shifts); otherwise nf4_linear_sgmv, then
// rotary_kv_cache_write. The checks of the latter run first, on views of the output (cos / sin, caches and y share a
// dtype and device; the caches are contiguous). As with rotary_kv_cache_write on CUDA, positions past cos / sin and
// slots outside the cache are not checked.
at::Tensor linear_sgmv_rotary_cuda(LORAX_NF4_LINEAR_SGMV_ROTARY_PARAMS) {
  const LoraArgs l = LORAX_NF4_LINEAR_SGMV_LORA;
  const RotaryArgs r = LORAX_NF4_LINEAR_SGMV_ROTARY;
  check_linear_sgmv(x, out_features, l, false);
  TORCH_CHECK(x.dim() == 2, "nf4_linear_sgmv_rotary: x must be [tokens, in], got ", x.sizes());
  at::Tensor y = at::empty({x.size(0), out_features}, x.options());
  auto [q, k, values] = qkv_heads(y, q_heads, kv_heads);  // (v is the LoRA shrink)
  const layers::RotaryShape shape =
      layers::check_rotary_kv_cache_write(q, k, values, cos, sin, positions, k_cache, v_cache, slot_mapping);
  const int64_t D = shape.head_dim;
  const AbsmaxState s = LORAX_NF4_ABSMAX_STATE;
  if (!gemv_serves(x, out_features, l) || D < 16 || (D & (D - 1)) != 0)
    return linear_sgmv_rotary_composite(x, codes, s, blocksize, out_features, bias, l, r);
  const at::Tensor pos = positions.contiguous(), slots = slot_mapping.contiguous();
  const cuda::GemvRope rope{cos.data_ptr(), sin.data_ptr(), pos.const_data_ptr<int64_t>(),
                            slots.const_data_ptr<int64_t>(), k_cache.data_ptr(), v_cache.data_ptr(),
                            static_cast<int>(shape.head_dim), static_cast<int>(q_heads), static_cast<int>(kv_heads)};
  linear_sgmv_gemv(x, codes, s, blocksize, out_features, bias, l, false, &rope, nullptr, y);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(lorax_core, CUDA, m) {
  m.impl("nf4_quantize", &quantize_cuda);
  m.impl("nf4_quantize_absmax", &quantize_absmax_cuda);
  m.impl("nf4_dequantize_absmax", &dequantize_absmax_cuda);
  m.impl("nf4_dequantize", &dequantize_cuda);
  m.impl("nf4_linear", &linear_cuda);
  m.impl("nf4_linear_sgmv", &linear_sgmv_cuda);
  m.impl("nf4_linear_sgmv_rotary", &linear_sgmv_rotary_cuda);
  m.impl("nf4_linear_sgmv_silu_shrink", &linear_sgmv_silu_shrink_cuda);
}

}  // namespace lorax::nf4

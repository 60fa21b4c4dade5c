// Input checks of the fused layer ops, shared by the CPU and CUDA kernels.
#include "layers/layers.h"

#include "attention/attention.h"
#include "common/checks.h"

namespace lorax::layers {
namespace {

void check_rows(const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be 2-D [tokens, features], got ", x.sizes());
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, op, ": ", name,
              "'s features must be contiguous (rows may be strided), got strides ", x.strides());
  CHECK_FLOAT_INPUT(x);
}

}  // namespace

Rows check_rms_norm(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  check_rows(x, "x", op);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), op, ": weight must be [", x.size(1), "], got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight is ", weight.scalar_type(), ", x ",
              x.scalar_type(), "; load the norm weights in the activation dtype");
  CHECK_CONTIGUOUS(weight);
  CHECK_SAME_DEVICE(x, weight);
  return {x.size(0), x.size(1)};
}

Rows check_add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight) {
  const Rows r = check_rms_norm(x, weight, "add_rms_norm");
  check_rows(residual, "residual", "add_rms_norm");
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "add_rms_norm: residual must match x (", x.sizes(), " ", x.scalar_type(), "), got ", residual.sizes(),
              " ", residual.scalar_type());
  CHECK_SAME_DEVICE(x, residual);
  return r;
}

RotaryShape check_rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& positions) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.size(0) == q.size(0) && k.size(2) == q.size(2),
              "rotary_embedding: q and k must be [tokens, heads, head_dim] with one token count and head_dim, got ",
              q.sizes(), " and ", k.sizes());
  const int64_t D = q.size(2);
  TORCH_CHECK(D % 2 == 0, "rotary_embedding: unsupported shape: head_dim ", D, " must be even");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1, "rotary_embedding: q and k must have contiguous head_dim, got "
              "strides ", q.strides(), " and ", k.strides());
  CHECK_FLOAT_INPUT(q);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && cos.scalar_type() == q.scalar_type() &&
                  sin.scalar_type() == q.scalar_type(),
              "rotary_embedding: q, k, cos and sin must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
              ", ", cos.scalar_type(), ", ", sin.scalar_type());
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == D && sin.sizes() == cos.sizes(),
              "rotary_embedding: cos and sin must be [positions, ", D, "], got ", cos.sizes(), " and ", sin.sizes());
  CHECK_CONTIGUOUS(cos);
  CHECK_CONTIGUOUS(sin);
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == q.size(0) && positions.scalar_type() == at::kLong,
              "rotary_embedding: positions must be int64 [", q.size(0), "], got ", positions.scalar_type(), " ",
              positions.sizes());
  CHECK_SAME_DEVICE(q, k);
  CHECK_SAME_DEVICE(q, cos);
  CHECK_SAME_DEVICE(q, sin);
  CHECK_SAME_DEVICE(q, positions);
  return {q.size(0), q.size(1), k.size(1), D, cos.size(0)};
}

Rows check_silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  check_rows(gate, "gate", "silu_mul");
  check_rows(up, "up", "silu_mul");
  TORCH_CHECK(up.sizes() == gate.sizes() && up.scalar_type() == gate.scalar_type(),
              "silu_mul: up must match gate (", gate.sizes(), " ", gate.scalar_type(), "), got ", up.sizes(), " ",
              up.scalar_type());
  CHECK_SAME_DEVICE(gate, up);
  return {gate.size(0), gate.size(1)};
}

RotaryShape check_rotary_kv_cache_write(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                                        const at::Tensor& k_cache, const at::Tensor& v_cache,
                                        const at::Tensor& slot_mapping) {
  const RotaryShape r = check_rotary(q, k, cos, sin, positions);
  attention::check_kv_cache_write(k_cache, v_cache, k, v, slot_mapping);
  TORCH_CHECK(v.stride(2) == 1, "rotary_kv_cache_write: v must have contiguous head_dim, got strides ", v.strides());
  return r;
}

}  // namespace lorax::layers

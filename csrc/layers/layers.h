// The small per-layer ops of a Llama-family decoder, fused: RMSNorm (with the residual add before it), rotary
// embeddings in place, and SwiGLU's silu(gate) * up. Without them a layer runs about thirty ATen kernels for
// this arithmetic; with them, four.
//
// Each op rounds to the activation dtype where transformers' eager code does, so fp16 / bf16 results equal
// transformers' up to the order of RMSNorm's fp32 sum:
//   rms_norm:     out = w * T(x * rsqrt(mean(x^2) + eps))                     (T(): round to the dtype)
//   add_rms_norm: s = T(x + residual); out = rms_norm(s)                      -> (out, s)
//   rotary:       x[i] = T(T(x[i] c[i]) - T(x[i+D/2] s[i])),  x[i+D/2] = T(T(x[i+D/2] c[i+D/2]) + T(x[i] s[i+D/2]))
//                 with c, s = cos[p], sin[p] at the token's position (the "rotate_half" layout)
//   silu_mul:     out = T(T(g / (1 + exp(-g))) * up)
//   rotary_kv_cache_write: rotary on q and k, then kv_cache_write (attention/attention.h) of the rotated k and v
// Rows may be strided (column slices of a fused projection's output); the last dimension must be contiguous.
#pragma once
#include <ATen/ATen.h>

namespace lorax::layers {

struct Rows {
  int64_t rows, cols;
};

struct RotaryShape {
  int64_t tokens, q_heads, k_heads, head_dim, positions;
};

// Checks shared by the backends.
Rows check_rms_norm(const at::Tensor& x, const at::Tensor& weight, const char* op);
Rows check_add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight);
RotaryShape check_rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& positions);
Rows check_silu_mul(const at::Tensor& gate, const at::Tensor& up);
RotaryShape check_rotary_kv_cache_write(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                                        const at::Tensor& k_cache, const at::Tensor& v_cache,
                                        const at::Tensor& slot_mapping);

}  // namespace lorax::layers

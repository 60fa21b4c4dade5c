// The fused layer ops on the CPU: fp32 math, rows in parallel, rounding as in layers.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "attention/attention.h"
#include "layers/layers.h"

namespace lorax::layers {
namespace {

// out = w * T(x * rsqrt(mean(x^2) + eps)) for one row of n values (x already rounded to T).
template <typename T>
void normalize_row(const T* x, const T* w, int64_t n, float eps, T* out) {
  double sum_sq = 0.0;
  for (int64_t i = 0; i < n; ++i) sum_sq += static_cast<double>(static_cast<float>(x[i])) * static_cast<float>(x[i]);
  const float inv = 1.0f / std::sqrt(static_cast<float>(sum_sq / static_cast<double>(n)) + eps);
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<T>(static_cast<float>(w[i]) * static_cast<float>(static_cast<T>(static_cast<float>(x[i]) * inv)));
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const Rows r = check_rms_norm(x, weight, "rms_norm");
  at::Tensor out = at::empty({r.rows, r.cols}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t stride = x.stride(0);
    at::parallel_for(0, r.rows, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) normalize_row(xp + t * stride, wp, r.cols, static_cast<float>(eps), op + t * r.cols);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                    const at::Tensor& weight, double eps) {
  const Rows r = check_add_rms_norm(x, residual, weight);
  at::Tensor out = at::empty({r.rows, r.cols}, x.options()), sum = at::empty({r.rows, r.cols}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_rms_norm_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = residual.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* sp = sum.data_ptr<scalar_t>();
    at::parallel_for(0, r.rows, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* xr = xp + t * x.stride(0);
        const scalar_t* rr = rp + t * residual.stride(0);
        scalar_t* s = sp + t * r.cols;
        for (int64_t i = 0; i < r.cols; ++i) s[i] = static_cast<scalar_t>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
        normalize_row(s, wp, r.cols, static_cast<float>(eps), op + t * r.cols);
      }
    });
  });
  return {out, sum};
}

// Rotate `heads` heads of one token in place (rotate_half layout; c, s: the position's cos / sin rows).
template <typename T>
void rotate_heads(T* x, int64_t heads, int64_t head_stride, const T* c, const T* s, int64_t half) {
  auto round = [](float v) { return static_cast<float>(static_cast<T>(v)); };
  for (int64_t h = 0; h < heads; ++h) {
    T* v = x + h * head_stride;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = static_cast<float>(v[i]), x2 = static_cast<float>(v[i + half]);
      v[i] = static_cast<T>(round(x1 * static_cast<float>(c[i])) - round(x2 * static_cast<float>(s[i])));
      v[i + half] =
          static_cast<T>(round(x2 * static_cast<float>(c[i + half])) + round(x1 * static_cast<float>(s[i + half])));
    }
  }
}

void rotary_embedding_cpu(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& positions) {
  const RotaryShape r = check_rotary(q, k, cos, sin, positions);
  const at::Tensor pos = positions.contiguous();
  const int64_t* pp = pos.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < r.tokens; ++t)
    TORCH_CHECK(pp[t] >= 0 && pp[t] < r.positions, "rotary_embedding: position ", pp[t], " of token ", t,
                " is outside the tables' ", r.positions, " positions");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rotary_embedding_cpu", [&] {
    scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* cp = cos.const_data_ptr<scalar_t>();
    const scalar_t* sp = sin.const_data_ptr<scalar_t>();
    const int64_t D = r.head_dim;
    at::parallel_for(0, r.tokens, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* c = cp + pp[t] * D;
        const scalar_t* s = sp + pp[t] * D;
        rotate_heads(qp + t * q.stride(0), r.q_heads, q.stride(1), c, s, D / 2);
        rotate_heads(kp + t * k.stride(0), r.k_heads, k.stride(1), c, s, D / 2);
      }
    });
  });
}

// Everything is checked before q or k changes: bad slots or positions leave all four tensors as they were.
void rotary_kv_cache_write_cpu(at::Tensor& q, at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                               const at::Tensor& sin, const at::Tensor& positions, at::Tensor& k_cache,
                               at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  check_rotary_kv_cache_write(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping);
  const attention::CacheShape c = attention::check_kv_cache_write_cpu(k_cache, v_cache, k, v, slot_mapping);
  rotary_embedding_cpu(q, k, cos, sin, positions);
  attention::write_kv_cache_cpu(c, k_cache, v_cache, k, v, slot_mapping);  // the slots were checked above
}

// ATen's own vectorized silu, then the product: the same roundings as layers.h, and faster on the CPU than a
// scalar loop over exp.
at::Tensor silu_mul_cpu(const at::Tensor& gate, const at::Tensor& up) {
  check_silu_mul(gate, up);
  return at::silu(gate).mul_(up);
}

}  // namespace

TORCH_LIBRARY_IMPL(lorax_core, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("add_rms_norm", &add_rms_norm_cpu);
  m.impl("rotary_embedding", &rotary_embedding_cpu);
  m.impl("silu_mul", &silu_mul_cpu);
  m.impl("rotary_kv_cache_write", &rotary_kv_cache_write_cpu);
}

}  // namespace lorax::layers

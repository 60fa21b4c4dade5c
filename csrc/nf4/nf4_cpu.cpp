// NF4 ops on the CPU: byte-for-byte the bitsandbytes format (see DESIGN.md "NF4 format").
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "common/checks.h"
#include "nf4/nf4.h"
#include "nf4/nf4_table.h"

namespace lorax::nf4 {
namespace {

constexpr float kNF4[kNumCodes] = LORAX_NF4_VALUES;
constexpr float kMinAbsmax = 1e-38f;  // bitsandbytes clamps absmax to this before dividing

// Scaled value of element x of a block: full blocks multiply by the reciprocal, the tail block divides,
// exactly as bitsandbytes' reference quantize_4bit does.
inline float scale_into_unit(float x, float absmax, float recip, bool tail) {
  float v = tail ? x / absmax : x * recip;
  return std::min(std::max(v, -1.0f), 1.0f);
}

inline float absmax_of(const float* p, int64_t begin, int64_t end) {
  float am = 0.0f;
  for (int64_t i = begin; i < end; ++i) am = std::max(am, std::fabs(p[i]));
  return am;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& x, int64_t blocksize) {
  check_blocksize(blocksize);
  CHECK_FLOAT_INPUT(x);
  at::Tensor xf = x.contiguous().to(at::kFloat).reshape({-1});  // [n]
  const int64_t n = xf.numel();
  TORCH_CHECK(n > 0, "nf4_quantize: cannot quantize an empty tensor");
  const int64_t full = n / blocksize, blocks = (n + blocksize - 1) / blocksize;
  at::Tensor codes = at::empty({(n + 1) / 2}, x.options().dtype(at::kByte));  // [ceil(n/2)]
  at::Tensor absmax = at::empty({blocks}, x.options().dtype(at::kFloat));     // [blocks]
  const float* xp = xf.data_ptr<float>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  float* ap = absmax.data_ptr<float>();
  at::parallel_for(0, blocks, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize, end = std::min(start + blocksize, n);
      const float am = absmax_of(xp, start, end);
      const bool tail = b >= full;
      const float clamped = std::max(am, kMinAbsmax);
      ap[b] = tail ? clamped : am;
      const float recip = 1.0f / clamped;
      // blocksize is even, so a byte never straddles two blocks; an odd n pads its last byte with code 0.0.
      for (int64_t i = start; i < end; i += 2) {
        int hi = nearest_code(scale_into_unit(xp[i], clamped, recip, tail), kNF4);
        int lo = i + 1 < end ? nearest_code(scale_into_unit(xp[i + 1], clamped, recip, tail), kNF4) : kZeroCode;
        cp[i / 2] = static_cast<uint8_t>((hi << 4) | lo);
      }
    }
  });
  return {codes, absmax};
}

std::tuple<at::Tensor, at::Tensor> quantize_absmax_cpu(const at::Tensor& absmax, const at::Tensor& code,
                                                       int64_t blocksize) {
  check_quantize_absmax_args(absmax, code, blocksize);  // absmax [blocks] centred (absmax - offset); code [256] sorted
  at::Tensor a = absmax.contiguous().reshape({-1});
  at::Tensor c = code.contiguous();
  const int64_t n = a.numel(), blocks = (n + blocksize - 1) / blocksize;
  at::Tensor q = at::empty({n}, a.options().dtype(at::kByte));
  at::Tensor absmax2 = at::empty({blocks}, a.options());
  const float* ap = a.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  float mids[255];
  for (int j = 0; j < 255; ++j) mids[j] = (cp[j] + cp[j + 1]) * 0.5f;
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* mp = absmax2.data_ptr<float>();
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize, end = std::min(start + blocksize, n);
      const float am = absmax_of(ap, start, end);
      mp[b] = am;
      const float recip = 1.0f / am;
      for (int64_t i = start; i < end; ++i) {  // an all-zero block gets code 0, as in bitsandbytes
        float v = std::min(std::max(ap[i] * recip, -1.0f), 1.0f);
        qp[i] = am == 0.0f ? 0 : static_cast<uint8_t>(code_on_grid(v, mids));
      }
    }
  });
  return {q, absmax2};
}

at::Tensor absmax_fp32_cpu(const AbsmaxState& s) {
  if (!s.nested()) return s.absmax.to(at::kFloat).contiguous();
  CHECK_DTYPE(s.absmax, at::kByte);
  at::Tensor q = s.absmax.contiguous();
  at::Tensor code = s.code2->to(at::kFloat).contiguous();
  at::Tensor absmax2 = s.absmax2->to(at::kFloat).contiguous();
  at::Tensor out = at::empty({q.numel()}, q.options().dtype(at::kFloat));
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* cp = code.data_ptr<float>();
  const float* mp = absmax2.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < q.numel(); ++i) {
    float scaled = cp[qp[i]] * mp[i / s.blocksize2];
    op[i] = scaled + s.offset_of(i);  // two roundings, as bitsandbytes: dequantize_blockwise(...) + offset
  }
  return out;
}

at::Tensor dequantize_cpu(const at::Tensor& codes, const AbsmaxState& s, int64_t blocksize, int64_t numel,
                          at::ScalarType dtype) {
  check_nf4_sizes("nf4_dequantize", codes, s.absmax.numel(), blocksize, numel);
  at::Tensor absmax = absmax_fp32_cpu(s);
  at::Tensor c = codes.contiguous();
  at::Tensor out = at::empty({numel}, codes.options().dtype(at::kFloat));
  const uint8_t* cp = c.data_ptr<uint8_t>();
  const float* ap = absmax.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, numel, 1 << 14, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      uint8_t byte = cp[i / 2];
      int code = (i % 2 == 0) ? (byte >> 4) : (byte & 0xF);
      op[i] = kNF4[code] * ap[i / blocksize];
    }
  });
  return dtype == at::kFloat ? out : out.to(dtype);
}

namespace {

at::Tensor op_dequantize(const at::Tensor& codes, const at::Tensor& absmax, const std::optional<at::Tensor>& code2,
                         const std::optional<at::Tensor>& absmax2, double offset, int64_t blocksize,
                         int64_t blocksize2, at::IntArrayRef shape, at::ScalarType dtype, LORAX_NF4_PARTS_PARAMS) {
  return dequantize_cpu(codes, LORAX_NF4_ABSMAX_STATE, blocksize, c10::multiply_integers(shape), dtype).reshape(shape);
}

at::Tensor op_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax,
                     const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& absmax2, double offset,
                     int64_t blocksize, int64_t blocksize2, int64_t out_features,
                     const std::optional<at::Tensor>& bias, LORAX_NF4_PARTS_PARAMS) {
  CHECK_FLOAT_INPUT(x);  // [..., in]
  const int64_t in_features = x.size(-1);
  at::Tensor w = dequantize_cpu(codes, LORAX_NF4_ABSMAX_STATE, blocksize, out_features * in_features, x.scalar_type())
                     .reshape({out_features, in_features});
  return at::linear(x, w, bias);
}

at::Tensor op_dequantize_absmax(const at::Tensor& qabsmax, const at::Tensor& code2, const at::Tensor& absmax2,
                                double offset, int64_t blocksize2, LORAX_NF4_PARTS_PARAMS) {
  return absmax_fp32_cpu(make_absmax_state(qabsmax, code2, absmax2, offset, blocksize2, part_starts, part_offsets));
}

at::Tensor op_linear_sgmv(LORAX_NF4_LINEAR_SGMV_PARAMS) {
  return linear_sgmv_composite(x, codes, LORAX_NF4_ABSMAX_STATE, blocksize, out_features, bias,
                               LORAX_NF4_LINEAR_SGMV_LORA, silu_mul);
}

std::tuple<at::Tensor, at::Tensor> op_linear_sgmv_silu_shrink(LORAX_NF4_LINEAR_SGMV_SILU_SHRINK_PARAMS) {
  const LoraArgs l = LORAX_NF4_LINEAR_SGMV_LORA;
  check_linear_sgmv(x, out_features, l, true);
  check_silu_shrink(x, l, next_modules, counters);  // (counters are for the CUDA kernel's CTAs)
  return linear_sgmv_silu_shrink_composite(x, codes, LORAX_NF4_ABSMAX_STATE, blocksize, out_features, bias, l,
                                           next_modules);
}

at::Tensor op_linear_sgmv_rotary(LORAX_NF4_LINEAR_SGMV_ROTARY_PARAMS) {
  return linear_sgmv_rotary_composite(x, codes, LORAX_NF4_ABSMAX_STATE, blocksize, out_features, bias,
                                      LORAX_NF4_LINEAR_SGMV_LORA, LORAX_NF4_LINEAR_SGMV_ROTARY);
}

}  // namespace

TORCH_LIBRARY_IMPL(lorax_core, CPU, m) {
  m.impl("nf4_quantize", &quantize_cpu);
  m.impl("nf4_quantize_absmax", &quantize_absmax_cpu);
  m.impl("nf4_dequantize_absmax", &op_dequantize_absmax);
  m.impl("nf4_dequantize", &op_dequantize);
  m.impl("nf4_linear", &op_linear);
  m.impl("nf4_linear_sgmv", &op_linear_sgmv);
  m.impl("nf4_linear_sgmv_rotary", &op_linear_sgmv_rotary);
  m.impl("nf4_linear_sgmv_silu_shrink", &op_linear_sgmv_silu_shrink);
}

}  // namespace lorax::nf4

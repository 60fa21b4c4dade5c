// NF4 ops: shared host-side declarations (CPU kernels, CUDA wrappers).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

#include "nf4/nf4_table.h"

namespace lorax::nf4 {

// The per-block absmax of an NF4 weight: fp32 [blocks], or double-quantized (uint8 [blocks] with an 8-bit
// code book, fp32 absmax per blocksize2 entries and an offset): absmax_i = code2[q_i] * absmax2[i / bs2] + offset.
// A fused projection's double-quantized parts keep their own offsets: blocks from part_starts[j] on add
// part_offsets[j] instead (blocks, increasing multiples of blocksize2; bitsandbytes' offset is one per weight).
struct AbsmaxState {
  at::Tensor absmax;
  std::optional<at::Tensor> code2;
  std::optional<at::Tensor> absmax2;
  double offset = 0.0;
  int64_t blocksize2 = 256;
  std::vector<int64_t> part_starts;
  std::vector<double> part_offsets;
  bool nested() const { return code2.has_value(); }
  // The offset of absmax block b.
  float offset_of(int64_t b) const {
    double o = offset;
    for (size_t j = 0; j < part_starts.size() && b >= part_starts[j]; ++j) o = part_offsets[j];
    return static_cast<float>(o);
  }
};

// The absmax state of an op call, checked: nested_code and nested_absmax come together, on the absmax's device,
// the 8-bit code book has its 256 entries, and the parts (only with them) start inside the absmax, in order, each on
// a nested block.
inline AbsmaxState make_absmax_state(const at::Tensor& absmax, const std::optional<at::Tensor>& code2,
                                     const std::optional<at::Tensor>& absmax2, double offset, int64_t blocksize2,
                                     at::IntArrayRef part_starts = {}, at::ArrayRef<double> part_offsets = {}) {
  TORCH_CHECK(code2.has_value() == absmax2.has_value(),
              "nf4: a double-quantized absmax needs both nested_code and nested_absmax");
  if (code2) {
    TORCH_CHECK(code2->numel() == 256, "nf4: nested_code must have 256 entries, got ", code2->numel());
    TORCH_CHECK(code2->device() == absmax.device() && absmax2->device() == absmax.device(),
                "nf4: absmax, nested_code and nested_absmax must be on one device");
  }
  TORCH_CHECK(part_starts.size() == part_offsets.size(), "nf4: part_starts and part_offsets differ in length (",
              part_starts.size(), " and ", part_offsets.size(), ")");
  if (!part_starts.empty()) {
    TORCH_CHECK(code2.has_value(), "nf4: part_starts / part_offsets are for a double-quantized absmax (the offset of "
                "each part's nested quantization); this absmax has no nested_code");
    TORCH_CHECK(part_starts.size() < kMaxAbsmaxParts, "nf4: at most ", kMaxAbsmaxParts, " parts (", kMaxAbsmaxParts - 1,
                " part_starts), got ", part_starts.size(), " part_starts; store the absmax in fp32 instead");
    int64_t last = 0;
    for (const int64_t start : part_starts) {
      TORCH_CHECK(start > last && start < absmax.numel() && start % blocksize2 == 0,
                  "nf4: part_starts must increase, lie inside the ", absmax.numel(), " absmax blocks and each start a "
                  "nested block of ", blocksize2, "; got ", part_starts);
      last = start;
    }
  }
  return AbsmaxState{absmax, code2, absmax2, offset, blocksize2, part_starts.vec(), part_offsets.vec()};
}

inline void check_blocksize(int64_t blocksize) {
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "nf4: blocksize must be a power of two in 32..4096 (as bitsandbytes), got ", blocksize);
}

// Sizes of an NF4 tensor: codes [ceil(numel / 2)] uint8, absmax [ceil(numel / blocksize)].
inline void check_nf4_sizes(const char* op, const at::Tensor& codes, int64_t absmax_numel, int64_t blocksize,
                            int64_t numel) {
  check_blocksize(blocksize);
  TORCH_CHECK(codes.scalar_type() == at::kByte, op, ": codes must be uint8, got ", codes.scalar_type());
  TORCH_CHECK(codes.numel() == (numel + 1) / 2, op, ": codes hold ", codes.numel() * 2, " values, the shape asks for ",
              numel);
  TORCH_CHECK(absmax_numel == (numel + blocksize - 1) / blocksize, op, ": ", absmax_numel, " absmax values for ",
              numel, " elements in blocks of ", blocksize);
}

// Arguments of the 8-bit absmax quantizer: fp32 values, a 256-entry fp32 code book, a positive blocksize.
inline void check_quantize_absmax_args(const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize) {
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, "nf4_quantize_absmax: absmax must be float32, got ",
              absmax.scalar_type());
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 256,
              "nf4_quantize_absmax: code must be 256 float32 values, got ", code.numel(), " ", code.scalar_type());
  TORCH_CHECK(absmax.device() == code.device(), "nf4_quantize_absmax: absmax and code must be on one device");
  TORCH_CHECK(blocksize > 0, "nf4_quantize_absmax: blocksize must be positive, got ", blocksize);
}

// nf4_linear_sgmv's optional LoRA arguments (lora/lora.h has the pool layout): all given, or none.
struct LoraArgs {
  std::optional<at::Tensor> arena, page_table, ranks, scales, seg_starts, seg_slots;
  std::optional<at::Tensor> v;  // x's sgmv_shrink, when done before (optional even with the rest)
  int64_t layer = 0;
  std::vector<int64_t> modules, columns;
  int64_t page_size = 0;
  bool given() const { return arena && page_table && ranks && scales && seg_starts && seg_slots; }
};

// The checks of nf4_linear_sgmv beyond those of the ops it is made of: LoRA all or nothing (v only with it), x 2-D
// with LoRA, columns covering [0, out_features), out_features even with silu_mul.
void check_linear_sgmv(const at::Tensor& x, int64_t out_features, const LoraArgs& l, bool silu_mul);

// nf4_linear, then sgmv into its output (LoRA given; sgmv_expand of v when given), then silu_mul of its halves
// (silu_mul): the ops called one after the other through the dispatcher (nf4_sgmv_common.cpp).
at::Tensor linear_sgmv_composite(const at::Tensor& x, const at::Tensor& codes, const AbsmaxState& s,
                                 int64_t blocksize, int64_t out_features, const std::optional<at::Tensor>& bias,
                                 const LoraArgs& l, bool silu_mul);

// nf4_linear_sgmv_silu_shrink's checks beyond check_linear_sgmv's (with silu_mul): the LoRA arguments given, 1 to
// kMaxModules next modules, counters (if given) int32 on x's device.
void check_silu_shrink(const at::Tensor& x, const LoraArgs& l, at::IntArrayRef next_modules,
                       const std::optional<at::Tensor>& counters);

// nf4_linear_sgmv with silu_mul, then sgmv_shrink of its output for next_modules: through the dispatcher.
std::tuple<at::Tensor, at::Tensor> linear_sgmv_silu_shrink_composite(const at::Tensor& x, const at::Tensor& codes,
                                                                     const AbsmaxState& s, int64_t blocksize,
                                                                     int64_t out_features,
                                                                     const std::optional<at::Tensor>& bias,
                                                                     const LoraArgs& l, at::IntArrayRef next_modules);

// nf4_linear_sgmv_rotary's rotary and KV cache arguments (rotary_kv_cache_write's, and the head counts that cut
// the projection's output into q | k | v).
struct RotaryArgs {
  int64_t q_heads, kv_heads;
  const at::Tensor &cos, &sin, &positions;
  at::Tensor &k_cache, &v_cache;
  const at::Tensor& slot_mapping;
};

// y [tokens, (q_heads + 2 kv_heads) * D] as q, k, v [tokens, heads, D] views; refuses an output that does not split
// into heads of one even head_dim.
std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_heads(const at::Tensor& y, int64_t q_heads, int64_t kv_heads);

// nf4_linear_sgmv (no silu_mul), then rotary_kv_cache_write of its q, k and v, both called through the dispatcher.
at::Tensor linear_sgmv_rotary_composite(const at::Tensor& x, const at::Tensor& codes, const AbsmaxState& s,
                                        int64_t blocksize, int64_t out_features,
                                        const std::optional<at::Tensor>& bias, const LoraArgs& l, const RotaryArgs& r);

// The op's arguments in schema order, as a kernel receives them (the rotary op's: no silu_mul, then its own).
#define LORAX_NF4_LINEAR_SGMV_COMMON_PARAMS                                                                        \
  const at::Tensor &x, const at::Tensor &codes, const at::Tensor &absmax, const std::optional<at::Tensor> &code2,  \
      const std::optional<at::Tensor> &absmax2, double offset, int64_t blocksize, int64_t blocksize2,              \
      int64_t out_features, const std::optional<at::Tensor> &bias, const std::optional<at::Tensor> &arena,         \
      const std::optional<at::Tensor> &page_table, const std::optional<at::Tensor> &ranks,                         \
      const std::optional<at::Tensor> &scales, const std::optional<at::Tensor> &seg_starts,                        \
      const std::optional<at::Tensor> &seg_slots, const std::optional<at::Tensor> &v, int64_t layer,             \
      at::IntArrayRef modules, at::IntArrayRef columns, int64_t page_size
// Every NF4 op's last two (part_starts, part_offsets), and the absmax state they and the op's others make.
#define LORAX_NF4_PARTS_PARAMS at::IntArrayRef part_starts, at::ArrayRef<double> part_offsets
#define LORAX_NF4_ABSMAX_STATE make_absmax_state(absmax, code2, absmax2, offset, blocksize2, part_starts, part_offsets)
#define LORAX_NF4_LINEAR_SGMV_PARAMS LORAX_NF4_LINEAR_SGMV_COMMON_PARAMS, bool silu_mul, LORAX_NF4_PARTS_PARAMS
#define LORAX_NF4_LINEAR_SGMV_SILU_SHRINK_PARAMS                                                                  \
  LORAX_NF4_LINEAR_SGMV_COMMON_PARAMS, at::IntArrayRef next_modules, const std::optional<at::Tensor> &counters,   \
      LORAX_NF4_PARTS_PARAMS
#define LORAX_NF4_LINEAR_SGMV_ROTARY_PARAMS                                                                        \
  LORAX_NF4_LINEAR_SGMV_COMMON_PARAMS, int64_t q_heads, int64_t kv_heads, const at::Tensor &cos,                   \
      const at::Tensor &sin, const at::Tensor &positions, at::Tensor &k_cache, at::Tensor &v_cache,                \
      const at::Tensor &slot_mapping, LORAX_NF4_PARTS_PARAMS
#define LORAX_NF4_LINEAR_SGMV_ROTARY                                                                              \
  RotaryArgs {                                                                                                    \
    q_heads, kv_heads, cos, sin, positions, k_cache, v_cache, slot_mapping                                        \
  }
#define LORAX_NF4_LINEAR_SGMV_LORA                                                                                \
  LoraArgs {                                                                                                      \
    arena, page_table, ranks, scales, seg_starts, seg_slots, v, layer, modules.vec(), columns.vec(), page_size   \
  }

std::tuple<at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& x, int64_t blocksize);
at::Tensor absmax_fp32_cpu(const AbsmaxState& s);
at::Tensor dequantize_cpu(const at::Tensor& codes, const AbsmaxState& s, int64_t blocksize, int64_t numel,
                          at::ScalarType dtype);

}  // namespace lorax::nf4

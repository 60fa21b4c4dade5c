// The op library `torch.ops.lorax_core`: schemas for every op, and the Python module `lorax_core._C`.
// Kernels register themselves per backend (nf4/nf4_cpu.cpp, nf4/nf4_cuda.cpp); fake kernels live in
// lorax_core/ops/_fake.py.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(lorax_core, m) {
  // NF4 (bitsandbytes layout). Absmax is fp32 [blocks], or uint8 [blocks] when nested_code/nested_absmax
  // are given (double quantization: absmax_i = nested_code[q_i] * nested_absmax[i // nested_blocksize] + offset).
  // A fused projection's parts keep their own offsets: absmax blocks from part_starts[j] on (increasing multiples of
  // nested_blocksize, at most kMaxAbsmaxParts - 1 of them, nf4/nf4.h) add part_offsets[j] in place of offset.
  m.def("nf4_quantize(Tensor x, int blocksize) -> (Tensor codes, Tensor absmax)");
  m.def("nf4_quantize_absmax(Tensor absmax, Tensor code, int blocksize) -> (Tensor qabsmax, Tensor nested_absmax)");
  m.def(
      "nf4_dequantize_absmax(Tensor qabsmax, Tensor nested_code, Tensor nested_absmax, float offset, "
      "int nested_blocksize, int[] part_starts=[], float[] part_offsets=[]) -> Tensor");
  m.def(
      "nf4_dequantize(Tensor codes, Tensor absmax, Tensor? nested_code, Tensor? nested_absmax, float offset, "
      "int blocksize, int nested_blocksize, SymInt[] shape, ScalarType dtype, int[] part_starts=[], "
      "float[] part_offsets=[]) -> Tensor");
  m.def(
      "nf4_linear(Tensor x, Tensor codes, Tensor absmax, Tensor? nested_code, Tensor? nested_absmax, float offset, "
      "int blocksize, int nested_blocksize, SymInt out_features, Tensor? bias, int[] part_starts=[], "
      "float[] part_offsets=[]) -> Tensor");

  // nf4_linear, plus the LoRA delta of each row's adapter (sgmv's arguments: all given, or none; columns from 0 to
  // out_features; v: the rows' sgmv_shrink when it is already done, e.g. by add_rms_norm_sgmv_shrink), then with
  // silu_mul SwiGLU's silu_mul of the output's halves (gate, up) -> [..., out_features / 2]:
  // on CUDA, for up to 8 rows of x, the GEMV does it all in its epilogue after one shrink kernel (each result
  // rounded once before silu_mul); else the ops one after the other.
  m.def(
      "nf4_linear_sgmv(Tensor x, Tensor codes, Tensor absmax, Tensor? nested_code, Tensor? nested_absmax, "
      "float offset, int blocksize, int nested_blocksize, SymInt out_features, Tensor? bias, Tensor? arena, "
      "Tensor? page_table, Tensor? ranks, Tensor? scales, Tensor? seg_starts, Tensor? seg_slots, Tensor? v, "
      "int layer, int[] modules, int[] columns, int page_size, bool silu_mul, int[] part_starts=[], "
      "float[] part_offsets=[]) -> Tensor");
  // nf4_linear_sgmv with silu_mul of a fused gate | up projection (LoRA arguments required), and the sgmv_shrink of
  // its output for next_modules of the same layer (the MLP's down): (h [T, out_features / 2], v [T, len(next_modules)
  // * max_rank]), v for the next projection's nf4_linear_sgmv. On CUDA, for up to 8 rows of x and with counters
  // (int32 zeros, left zero; may be the ones decode attention shares), the GEMV's epilogue does the shrink too.
  m.def(
      "nf4_linear_sgmv_silu_shrink(Tensor x, Tensor codes, Tensor absmax, Tensor? nested_code, "
      "Tensor? nested_absmax, float offset, int blocksize, int nested_blocksize, SymInt out_features, Tensor? bias, "
      "Tensor? arena, Tensor? page_table, Tensor? ranks, Tensor? scales, Tensor? seg_starts, Tensor? seg_slots, "
      "Tensor? v, int layer, int[] modules, int[] columns, int page_size, int[] next_modules, "
      "Tensor(a!)? counters=None, int[] part_starts=[], float[] part_offsets=[]) -> (Tensor, Tensor)");
  // nf4_linear_sgmv of a fused q | k | v projection (q_heads heads, then kv_heads of k and of v), then
  // rotary_kv_cache_write of its q, k and v: returns the output with q and k rotated, and writes k and v to the
  // cache. On CUDA, for up to 8 rows of x, the GEMV's epilogue does the rotary and the cache write.
  m.def(
      "nf4_linear_sgmv_rotary(Tensor x, Tensor codes, Tensor absmax, Tensor? nested_code, Tensor? nested_absmax, "
      "float offset, int blocksize, int nested_blocksize, SymInt out_features, Tensor? bias, Tensor? arena, "
      "Tensor? page_table, Tensor? ranks, Tensor? scales, Tensor? seg_starts, Tensor? seg_slots, Tensor? v, "
      "int layer, int[] modules, int[] columns, int page_size, int q_heads, int kv_heads, Tensor cos, Tensor sin, "
      "Tensor positions, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, int[] part_starts=[], "
      "float[] part_offsets=[]) -> Tensor");

  // Multi-adapter LoRA through the paged adapter pool (csrc/lora/lora.h has the layout). One call serves the
  // modules of a fused projection, which share x. Shrink: v [T, modules * max_rank] fp32, module i's block =
  // x @ A_i[a(t)].T; expand (in place): y[:, columns[i] : columns[i + 1]] += scales[a(t)] * v_i @ B_i[a(t)].T.
  // SGMV takes segments of tokens sharing an adapter (they should cover the rows; v rows outside every segment
  // are zero on the CPU and unspecified on CUDA; segments past the rows, or adapters outside the pool, are an error
  // on the CPU and clamped on CUDA, which cannot check them without waiting for the GPU), BGMV one adapter index
  // per token (-1: none; on CUDA, indices outside the pool too).
  m.def(
      "sgmv_shrink(Tensor x, Tensor arena, Tensor page_table, Tensor ranks, Tensor seg_starts, Tensor seg_adapters, "
      "int layer, int[] modules, int page_size) -> Tensor");
  m.def(
      "bgmv_shrink(Tensor x, Tensor arena, Tensor page_table, Tensor ranks, Tensor adapter_indices, int layer, "
      "int[] modules, int page_size) -> Tensor");
  m.def(
      "sgmv_expand(Tensor(a!) y, Tensor v, Tensor arena, Tensor page_table, Tensor ranks, Tensor scales, "
      "Tensor seg_starts, Tensor seg_adapters, int layer, int[] modules, int[] columns, int page_size) -> ()");
  m.def(
      "bgmv_expand(Tensor(a!) y, Tensor v, Tensor arena, Tensor page_table, Tensor ranks, Tensor scales, "
      "Tensor adapter_indices, int layer, int[] modules, int[] columns, int page_size) -> ()");
  // Shrink then expand in one op (what lorax_core.ops.sgmv / bgmv call): y += the LoRA delta, in place; BGMV groups
  // its tokens once for both kernels.
  m.def(
      "sgmv(Tensor(a!) y, Tensor x, Tensor arena, Tensor page_table, Tensor ranks, Tensor scales, "
      "Tensor seg_starts, Tensor seg_adapters, int layer, int[] modules, int[] columns, int page_size) -> ()");
  m.def(
      "bgmv(Tensor(a!) y, Tensor x, Tensor arena, Tensor page_table, Tensor ranks, Tensor scales, "
      "Tensor adapter_indices, int layer, int[] modules, int[] columns, int page_size) -> ()");

  // add_rms_norm, then sgmv_shrink of its output: (out, residual_out, v). On CUDA one row (a batch-1 decode step)
  // takes one kernel for both (the norm before a projection whose LoRA shrink would read its output).
  m.def(
      "add_rms_norm_sgmv_shrink(Tensor x, Tensor residual, Tensor weight, float eps, Tensor arena, Tensor page_table, "
      "Tensor ranks, Tensor seg_starts, Tensor seg_adapters, int layer, int[] modules, int page_size) -> "
      "(Tensor out, Tensor residual_out, Tensor v)");

  // Paged KV cache (csrc/attention/attention.h has the layout): store the new tokens' keys and values in their
  // slots, and decode attention of one query token per sequence over its blocks (GQA, optional sliding window).
  m.def("kv_cache_write(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slot_mapping) -> ()");
  m.def(
      "paged_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
      "float scale, int sliding_window, Tensor(a!)? counters=None) -> Tensor");
  // paged_attention_decode, then sgmv_shrink of its output [batch, heads * head_dim] for the projection that reads it
  // (o_proj): (out, v), v for that projection's nf4_linear_sgmv. counters: attention's, then one per sequence
  // (int32 zeros, at least batch * (kv_heads + 1); left zero). On CUDA with counters and one module, the attention
  // kernel does the shrink too.
  m.def(
      "paged_attention_decode_sgmv_shrink(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, float scale, int sliding_window, Tensor arena, Tensor page_table, Tensor ranks, "
      "Tensor seg_starts, Tensor seg_adapters, int layer, int[] modules, int page_size, Tensor(a!)? counters=None) "
      "-> (Tensor out, Tensor v)");

  // The small per-layer ops, fused (csrc/layers/layers.h has the math and its rounding): RMSNorm, RMSNorm after
  // the residual add (returns the normalized rows and the new residual), rotary embeddings of q and k in place
  // (cos / sin tables [positions, head_dim] indexed by each token's position), and SwiGLU's silu(gate) * up.
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor out, Tensor residual_out)");
  m.def("rotary_embedding(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor positions) -> ()");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  // rotary_embedding, then kv_cache_write of the rotated k and v: what attention does before it reads the cache,
  // in one CUDA kernel instead of two.
  m.def(
      "rotary_kv_cache_write(Tensor(a!) q, Tensor(b!) k, Tensor v, Tensor cos, Tensor sin, Tensor positions, "
      "Tensor(c!) k_cache, Tensor(d!) v_cache, Tensor slot_mapping) -> ()");
}

#ifdef LORAX_WITH_CUDA
namespace lorax {
bool set_programmatic_launch(bool enabled);  // common/launch.cu
}  // namespace lorax
#endif
#if defined(LORAX_WITH_CUDA) || defined(LORAX_EMULATOR)
namespace lorax::nf4::cuda {
bool set_gemv_staging(bool staged);  // nf4/nf4_kernels.cu
}  // namespace lorax::nf4::cuda
#endif

namespace {
bool built_with_cuda() {
#ifdef LORAX_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool set_programmatic_launch(bool enabled) {
#ifdef LORAX_WITH_CUDA
  return lorax::set_programmatic_launch(enabled);
#else
  (void)enabled;
  return false;
#endif
}

bool set_nf4_gemv_staging(bool staged) {
#if defined(LORAX_WITH_CUDA) || defined(LORAX_EMULATOR)
  return lorax::nf4::cuda::set_gemv_staging(staged);
#else
  (void)staged;
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lorax-core compiled ops; use them through torch.ops.lorax_core or lorax_core.ops";
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in");
  m.def("set_programmatic_launch", &set_programmatic_launch, pybind11::arg("enabled"),
        "Programmatic dependent launch of later CUDA kernels on or off (csrc/common/launch.cuh); returns the "
        "previous setting");
  m.def("set_nf4_gemv_staging", &set_nf4_gemv_staging, pybind11::arg("staged"),
        "The NF4 GEMV's main loop for later launches: loads staged in shared memory (true) or in registers (false, "
        "the default; csrc/nf4/nf4_cuda.h); returns the previous setting");
}

// NF4 CUDA kernels: quantize, dequantize, a GEMV for a few rows of activations and the fused dequant +
// tensor-core GEMM for more of them. Numerics match the CPU kernels bit for bit (dequantize) by using explicit
// _rn intrinsics where bitsandbytes rounds twice; the GEMV and the GEMM accumulate in fp32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <type_traits>

#include "common/convert.cuh"
#include "common/cp_async.cuh"
#include "common/lane_table.cuh"
#include "common/launch.cuh"
#include "common/mma.cuh"
#include "common/warp.cuh"
#include "lora/lora_device.cuh"
#include "nf4/nf4_cuda.h"
#include "nf4/nf4_table.h"

namespace lorax::nf4::cuda {
namespace {

constexpr float kMinAbsmax = 1e-38f;

__device__ __forceinline__ float block_max(float v, float* scratch /* [32] */) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_max(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.0f;
  v = warp_max(v);
  __syncthreads();
  return v;
}

// The code book and, for double quantization, the 8-bit absmax code book and the parts' offsets, staged in shared
// memory.
struct Tables {
  float nf4[kNumCodes];
  float code2[256];
  float offsets[kMaxAbsmaxParts];
};

__device__ __forceinline__ void load_tables(Tables& t, const AbsmaxArgs& a) {
  constexpr float kValues[kNumCodes] = LORAX_NF4_VALUES;
  for (int i = threadIdx.x; i < kNumCodes; i += blockDim.x) t.nf4[i] = kValues[i];
  if (a.code2 != nullptr) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) t.code2[i] = a.code2[i];
    if (threadIdx.x == 0) {  // constant indices: the arguments stay in the parameter bank, not a local copy
#pragma unroll
      for (int j = 0; j < kMaxAbsmaxParts; ++j) t.offsets[j] = a.offsets[j];
    }
  }
  __syncthreads();
}

// The absmax of block b as loaded (prefetchable), and its decoding once the load has landed.
struct RawAbsmax {
  uint32_t bits;  // fp32 bits, or the 8-bit code when double-quantized (| its part << 8 with parts)
  float scale2;   // nested absmax of its group (double quantization)
};

// How a kernel reads the absmax: fp32, double-quantized with one offset, or double-quantized with the offset of the
// part each block is in (AbsmaxArgs::part_groups: a fused projection). kParts serves all double-quantized weights;
// kNested is kParts without the part's lookup, for the GEMV's hot loop.
enum class AbsmaxKind { kFp32, kNested, kParts };

__host__ __device__ __forceinline__ AbsmaxKind absmax_kind(const AbsmaxArgs& a) {
  return a.code2 == nullptr ? AbsmaxKind::kFp32
                            : (a.part_groups[0] == 0xFFFFFFFFu ? AbsmaxKind::kNested : AbsmaxKind::kParts);
}

// The part (of a fused projection) that nested block `group` is in: which of Tables::offsets it adds.
__device__ __forceinline__ uint32_t absmax_part(const AbsmaxArgs& a, uint32_t group) {
  static_assert(kMaxAbsmaxParts == 3, "one comparison a part start");
  return static_cast<uint32_t>(group >= a.part_groups[0]) + static_cast<uint32_t>(group >= a.part_groups[1]);
}

template <AbsmaxKind kKind>
__device__ __forceinline__ RawAbsmax load_absmax(const AbsmaxArgs& a, int64_t b) {
  if constexpr (kKind == AbsmaxKind::kFp32) {
    return {__float_as_uint(__ldg(static_cast<const float*>(a.absmax) + b)), 0.0f};
  } else if constexpr (kKind == AbsmaxKind::kNested) {
    return {__ldg(static_cast<const uint8_t*>(a.absmax) + b), __ldg(a.absmax2 + (b >> a.blocksize2_log2))};
  } else {
    const uint32_t group = static_cast<uint32_t>(b >> a.blocksize2_log2);  // blocks < 2^31 (gemm_supported)
    const uint32_t code = __ldg(static_cast<const uint8_t*>(a.absmax) + b);
    return {code | absmax_part(a, group) << 8, __ldg(a.absmax2 + group)};
  }
}

template <AbsmaxKind kKind>
__device__ __forceinline__ float decode_absmax(const AbsmaxArgs& a, const Tables& t, RawAbsmax r) {
  if constexpr (kKind == AbsmaxKind::kFp32) {
    return __uint_as_float(r.bits);
  } else if constexpr (kKind == AbsmaxKind::kNested) {
    return __fadd_rn(__fmul_rn(t.code2[r.bits], r.scale2), a.offsets[0]);  // two roundings, as bitsandbytes
  } else {
    return __fadd_rn(__fmul_rn(t.code2[r.bits & 0xFFu], r.scale2), t.offsets[r.bits >> 8]);
  }
}

// For kernels that learn the kind at run time (kParts: any double-quantized weight).
__device__ __forceinline__ RawAbsmax load_absmax(const AbsmaxArgs& a, int64_t b) {
  return a.code2 == nullptr ? load_absmax<AbsmaxKind::kFp32>(a, b) : load_absmax<AbsmaxKind::kParts>(a, b);
}

__device__ __forceinline__ float decode_absmax(const AbsmaxArgs& a, const Tables& t, RawAbsmax r) {
  return a.code2 == nullptr ? decode_absmax<AbsmaxKind::kFp32>(a, t, r) : decode_absmax<AbsmaxKind::kParts>(a, t, r);
}

__device__ __forceinline__ float read_absmax(const AbsmaxArgs& a, const Tables& t, int64_t b) {
  return decode_absmax(a, t, load_absmax(a, b));
}

// ---- quantize ------------------------------------------------------------------------------------------------
// One warp per quantization block.
__global__ void quantize_kernel(const float* __restrict__ x, int64_t n, int bs_log2, int64_t blocks,
                                uint8_t* __restrict__ codes, float* __restrict__ absmax) {
  pdl_prologue();
  constexpr float kValues[kNumCodes] = LORAX_NF4_VALUES;
  const int lane = threadIdx.x % 32;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (b >= blocks) return;
  const int64_t bs = int64_t{1} << bs_log2, start = b * bs, end = min(start + bs, n);
  float am = 0.0f;
  for (int64_t i = start + lane; i < end; i += 32) am = fmaxf(am, fabsf(x[i]));
  am = warp_max(am);
  const bool tail = end - start < bs;  // the tail block divides and keeps its clamped absmax
  const float clamped = fmaxf(am, kMinAbsmax);
  const float recip = __fdiv_rn(1.0f, clamped);
  if (lane == 0) absmax[b] = tail ? clamped : am;
  auto code_of = [&](float v) {
    v = tail ? __fdiv_rn(v, clamped) : __fmul_rn(v, recip);
    return nearest_code(fminf(fmaxf(v, -1.0f), 1.0f), kValues);
  };
  for (int64_t i = start + 2 * lane; i < end; i += 64) {
    const int hi = code_of(x[i]);
    const int lo = i + 1 < end ? code_of(x[i + 1]) : kZeroCode;
    codes[i / 2] = static_cast<uint8_t>((hi << 4) | lo);
  }
}

// One CTA per block of the 8-bit absmax quantization (bitsandbytes' grid search, see nf4_table.h).
__global__ void quantize_absmax_kernel(const float* __restrict__ a, int64_t n, const float* __restrict__ code,
                                       int64_t bs, uint8_t* __restrict__ q, float* __restrict__ absmax2) {
  pdl_prologue();
  __shared__ float mids[255];
  __shared__ float scratch[32];
  for (int j = threadIdx.x; j < 255; j += blockDim.x) mids[j] = __fmul_rn(__fadd_rn(code[j], code[j + 1]), 0.5f);
  const int64_t start = blockIdx.x * bs, end = min(start + bs, n);
  float am = 0.0f;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) am = fmaxf(am, fabsf(a[i]));
  am = block_max(am, scratch);  // also orders the writes to mids
  if (threadIdx.x == 0) absmax2[blockIdx.x] = am;
  const float recip = __fdiv_rn(1.0f, am);
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float v = fminf(fmaxf(__fmul_rn(a[i], recip), -1.0f), 1.0f);
    q[i] = am == 0.0f ? 0 : static_cast<uint8_t>(code_on_grid(v, mids));
  }
}

__global__ void dequantize_absmax_kernel(AbsmaxArgs a, int64_t blocks, float* __restrict__ out) {
  pdl_prologue();
  __shared__ Tables t;
  load_tables(t, a);
  for (int64_t b = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; b < blocks; b += int64_t{gridDim.x} * blockDim.x)
    out[b] = read_absmax(a, t, b);
}

// ---- dequantize ----------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Store 8 consecutive values (16-byte aligned destination).
template <typename T>
__device__ __forceinline__ void store8(T* dst, const float (&v)[8]) {
  *reinterpret_cast<uint4*>(dst) =
      make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]), pack2<T>(v[6], v[7]));
}
template <>
__device__ __forceinline__ void store8<float>(float* dst, const float (&v)[8]) {
  reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

// Each thread turns 4 bytes of codes (8 values) into 16 or 32 bytes of output; a partial last chunk goes
// element by element.
template <typename T>
__global__ void dequantize_kernel(const uint8_t* __restrict__ codes, AbsmaxArgs a, int bs_log2, int64_t n,
                                  T* __restrict__ out) {
  pdl_prologue();
  __shared__ Tables t;
  load_tables(t, a);
  const int64_t chunks = (n + 7) / 8;
  for (int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; c < chunks; c += int64_t{gridDim.x} * blockDim.x) {
    const int64_t e0 = c * 8;
    const float s = read_absmax(a, t, e0 >> bs_log2);  // 8 divides blocksize: one block per chunk
    if (e0 + 8 <= n) {
      const uint32_t word = __ldcs(reinterpret_cast<const unsigned int*>(codes + c * 4));
      float v[8];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint32_t byte = (word >> (8 * k)) & 0xFF;
        v[2 * k] = __fmul_rn(t.nf4[byte >> 4], s);
        v[2 * k + 1] = __fmul_rn(t.nf4[byte & 0xF], s);
      }
      store8<T>(out + e0, v);
    } else {
      for (int64_t e = e0; e < n; ++e) {
        const uint8_t byte = codes[e / 2];
        out[e] = from_float<T>(__fmul_rn(t.nf4[(e % 2 == 0) ? (byte >> 4) : (byte & 0xF)], s));
      }
    }
  }
}

// ---- fused dequant + tensor-core GEMM (small M) ---------------------------------------------------------------
// A warp computes a 16 (output features) x 8*NT (tokens) tile over slices of 128 k. Lane (g, t) = (lane / 4,
// lane % 4) loads 16 bytes of codes (32 values, k in [32t, 32t + 32)) from rows g and g + 8 straight from the
// bitsandbytes layout: 16 rows x 64 bytes, every 32-byte sector fully used. The k order inside an mma is
// permuted (mma-k 2t, 2t+1 | 2t+8, 2t+9 of subtile j <-> k = 32t + 4j + {0, 1 | 2, 3}) identically for the
// weight and the activations, so each lane also reads its activations as 64 contiguous bytes.
constexpr int kWarps = 4;
constexpr int kTileN = 16;
constexpr int kTileK = 128;

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i % 4 == 0 ? v.x : i % 4 == 1 ? v.y : i % 4 == 2 ? v.z : v.w;
}

__device__ __forceinline__ uint32_t byte_of(const uint4& v, int i) { return (word_of(v, i / 4) >> (8 * (i % 4))) & 0xFF; }

template <typename T, int NT>
__global__ void __launch_bounds__(kWarps * 32) gemm_kernel(const T* __restrict__ x, int M, int K,
                                                           const uint8_t* __restrict__ codes, AbsmaxArgs a,
                                                           int bs_log2, int N, int kt_per_split,
                                                           float* __restrict__ ws) {
  pdl_prologue();
  __shared__ Tables t;
  __shared__ float red[kWarps][NT][32][4];
  load_tables(t, a);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
  const int64_t row0 = int64_t{blockIdx.x} * kTileN + g, row1 = row0 + 8;
  const int KT = K / kTileK, split = blockIdx.y;
  const int kt_begin = split * kt_per_split, kt_end = min(KT, kt_begin + kt_per_split);
  const uint8_t* c0 = codes + row0 * (K / 2) + 16 * tq;
  const uint8_t* c1 = codes + row1 * (K / 2) + 16 * tq;

  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;

  // Everything a tile needs from memory, loaded one tile ahead so the loads overlap the previous tile's math.
  struct Stage {
    uint4 q0, q1;          // codes of rows g and g + 8
    RawAbsmax s0, s1;      // their absmax
    uint4 x0[4];           // activations of the first n-tile
  };
  auto load_stage = [&](int kt) {
    Stage st;
    const int64_t k0 = int64_t{kt} * kTileK + 32 * tq;
    st.q0 = __ldcs(reinterpret_cast<const uint4*>(c0 + int64_t{kt} * (kTileK / 2)));
    st.q1 = __ldcs(reinterpret_cast<const uint4*>(c1 + int64_t{kt} * (kTileK / 2)));
    st.s0 = load_absmax(a, (row0 * K + k0) >> bs_log2);
    st.s1 = load_absmax(a, (row1 * K + k0) >> bs_log2);
#pragma unroll
    for (int i = 0; i < 4; ++i)
      st.x0[i] = g < M ? __ldg(reinterpret_cast<const uint4*>(x + int64_t{g} * K + k0) + i) : make_uint4(0, 0, 0, 0);
    return st;
  };

  int kt = kt_begin + warp;
  Stage next;
  if (kt < kt_end) next = load_stage(kt);
  for (; kt < kt_end; kt += kWarps) {
    const Stage cur = next;
    if (kt + kWarps < kt_end) next = load_stage(kt + kWarps);
    const int64_t k0 = int64_t{kt} * kTileK + 32 * tq;
    const float s0 = decode_absmax(a, t, cur.s0), s1 = decode_absmax(a, t, cur.s1);
    uint32_t frag[8][4];  // A fragments of the 8 k16 subtiles
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint32_t b00 = byte_of(cur.q0, 2 * j), b01 = byte_of(cur.q0, 2 * j + 1);
      const uint32_t b10 = byte_of(cur.q1, 2 * j), b11 = byte_of(cur.q1, 2 * j + 1);
      frag[j][0] = pack2<T>(__fmul_rn(t.nf4[b00 >> 4], s0), __fmul_rn(t.nf4[b00 & 0xF], s0));
      frag[j][1] = pack2<T>(__fmul_rn(t.nf4[b10 >> 4], s1), __fmul_rn(t.nf4[b10 & 0xF], s1));
      frag[j][2] = pack2<T>(__fmul_rn(t.nf4[b01 >> 4], s0), __fmul_rn(t.nf4[b01 & 0xF], s0));
      frag[j][3] = pack2<T>(__fmul_rn(t.nf4[b11 >> 4], s1), __fmul_rn(t.nf4[b11 & 0xF], s1));
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int n = nt * 8 + g;
      uint4 xv[4] = {cur.x0[0], cur.x0[1], cur.x0[2], cur.x0[3]};
      if (nt > 0) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
          xv[i] = n < M ? __ldg(reinterpret_cast<const uint4*>(x + int64_t{n} * K + k0) + i) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int j = 0; j < 8; ++j)  // words 2j, 2j + 1 of the lane's 16 words: k = 32t + 4j + {0, 1}, {2, 3}
        mma_m16n8k16<T>(acc[nt], frag[j], word_of(xv[j / 2], (2 * j) % 4), word_of(xv[j / 2], (2 * j + 1) % 4));
    }
  }

  // Sum the warps' partial tiles; warp 0 writes this split's slice of the workspace [splits, M, N].
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][nt][lane][i] = acc[nt][i];
  __syncthreads();
  if (warp != 0) return;
  float* out = ws + int64_t{split} * M * N;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int w = 0; w < kWarps; ++w)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[i] += red[w][nt][lane][i];
    const int n = nt * 8 + 2 * tq;  // C fragment: rows g, g + 8; columns 2t, 2t + 1
    if (n < M) {
      out[int64_t{n} * N + row0] = s[0];
      out[int64_t{n} * N + row1] = s[2];
    }
    if (n + 1 < M) {
      out[int64_t{n + 1} * N + row0] = s[1];
      out[int64_t{n + 1} * N + row1] = s[3];
    }
  }
}

template <typename T>
__global__ void splitk_epilogue_kernel(const float* __restrict__ ws, int splits, int64_t MN, int N,
                                       const T* __restrict__ bias, T* __restrict__ y) {
  pdl_prologue();
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < MN; i += int64_t{gridDim.x} * blockDim.x) {
    float s = bias != nullptr ? to_float(bias[i % N]) : 0.0f;
    for (int k = 0; k < splits; ++k) s += ws[k * MN + i];
    y[i] = from_float<T>(s);
  }
}

// ---- GEMV for up to 8 rows of x (decode) ----------------------------------------------------------------------
// A CTA computes a tile of 16 weight rows for the MT rows of x at a time; its 8 warps split the tile's k in steps of
// 128 and meet in shared memory. Within a step, lane (g, t) = (lane / 4, lane % 4) loads 16 bytes of codes (its
// chunk: 32 weights, k in [32c, 32c + 32), c = 4 * step + t, inside one absmax block as blocks hold at least 32)
// from each of the tile's rows g and g + 8, the layout gemm_kernel reads.
// The weights multiply x on the tensor cores (mma m16n8k16, the tile's rows as A), unscaled: a code byte is one
// shared-memory lookup, in a table of its two NF4 values rounded to T, straight into an A register. That lookup is
// the work per weight (bitsandbytes' code book has no arithmetic form). The GEMV on CUDA cores before this one
// spent two lookups and two FMAs per code byte, about 380 instructions per KB of codes (sm_90 SASS, this one about
// 205): issue-bound, 1.2 TB/s for 14336x4096 on an H100 (bench/RESULTS.md, 2026-11-24).
// Each lane's chunk has its own absmax, so the chunks must not be summed together before the scale: B column 2t
// holds x on lane t's chunk alone (lane (2t, t) loads it; every other B value is zero), so C[row][2t] is lane t's
// chunk's dot product, which the C fragment hands back to lane (g, t) itself: it scales it by its own absmax, as the
// GEMV on CUDA cores did. The table has a copy per lane (32 KB): lane l reads bank l, and no two lanes conflict.
// More rows of x take the odd columns: column 2t + 1 holds the next row of x on lane t's chunk, and with more than
// two rows the same A fragments meet a B of the next two in another mma, so a weight is looked up once for all.
// The product is x @ (T(v[code]) * absmax).T: the NF4 values rounded to T, exact products, fp32 sums, one rounding
// of each output. (bitsandbytes' own GEMV rounds the value, the absmax and each product to T.)
// The grid is as many CTAs as fit on the GPU at once, each looping over tiles, so the table is filled once per CTA;
// each warp loads its next step's codes and absmax (two steps ahead with more than one row of x) before it computes
// the current one, across tiles too, and the CTA asks L2 for the next tile's codes (a bulk request a row) as it
// starts one. Before its PDL prologue (launch.cuh) the CTA asks L2 for its first tile's codes and every tile's
// absmax, and fills the table: all overlap the end of the kernel before it.
// Staged (kStaged, set_gemv_staging): instead of each warp's registers, slots of shared memory take the loads.
// The CTA's threads copy (cp.async) the codes and absmax of a stage, 1024 elements of k of the tile's 16 rows (a
// step for each warp), two or three stages ahead of the one its warps read, across tiles too: 18-28 KB in flight a
// CTA that hold no registers, where the registers' step is 8 KB (16 KB with two steps ahead).
// The epilogue can do what would otherwise be two or three more kernels of a decode step (gemv() in nf4_cuda.h):
// - the LoRA expand of each row of x's adapter (kLora): the 8 warps split its rank rows and add their share to their
//   partial sums, so the delta joins each output before its one rounding; its loads overlap the first step's;
// - SwiGLU (silu_mul): a tile is gate rows i .. i + 7 (A rows 0-7) and up rows N/2 + i .. (A rows 8-15), and the
//   last warp writes T(T(silu(g)) * u);
// - rotary and the KV cache write of q | k | v (GemvRope): a tile is rows i .. i + 7 of a head's first half and
//   their partners D/2 further, so lanes l and l ^ 8 of the last warp hold the two elements of a rotated pair.
constexpr int kGemvWarps = 8;
constexpr int kGemvRows = 16;   // a tile: the mma's A rows
// CTAs per SM the grid counts on (launch bounds): at one row of x, 35 KB of shared memory and at most 85 registers
// per thread each; with more rows, whose A fragments stay in registers while the token pairs take their turns, 2.
template <int MT>
constexpr int kGemvCtasPerSm = MT == 1 ? 3 : 2;
static_assert(kGemvCtasPerSm<1> <= kGemvMaxCtasPerSm && kGemvCtasPerSm<8> <= kGemvMaxCtasPerSm);

// The staged main loop's slots (kStaged). A stage is kStageK elements of k of a tile's 16 weight rows, a step (128
// elements) for each warp. In its slot of dynamic shared memory:
// - the codes, [16 rows][32 chunks] of 16 bytes, chunk c of row r at c ^ 4 (r & 1): the two rows a quarter-warp
//   reads (quads g = 2h, 2h + 1: rows 2h and 2h + 1, 4 chunks each) fall in the two halves of the banks;
// - then the absmax, [words][16 rows] of 32 bits: the row's blocks from its first (fp32); or, double-quantized, its
//   8-bit codes from the 32-bit word holding its first block's, then the nested absmax of its groups from its first.
static_assert(kGemvWarps == 8 && kGemvRows == 16, "a stage's copies: thread (w, l) takes chunk l of rows w, w + 8");
constexpr int kStageK = 128 * kGemvWarps;
constexpr int kStageChunks = kStageK / 32;  // of 16 bytes (32 codes) a row
template <int MT>
constexpr int kGemvStages = MT == 1 ? 3 : 4;  // slots: 2 or 3 stages in flight while the warps read one

struct StageLayout {
  int code_words;  // the absmax's words a row: its blocks (fp32), or its 8-bit codes' words (double-quantized)
  int words;       // and the nested absmax's after them
};

__host__ __device__ __forceinline__ StageLayout stage_layout(int bs_log2, int bs2_log2, bool dq) {
  // the most blocks (groups) a row's stage touches: it starts at a multiple of 32 elements (of blocks)
  const int blocks = (((1 << bs_log2) - 32 + kStageK - 1) >> bs_log2) + 1;
  if (!dq) return {blocks, blocks};
  const int code_words = (3 + blocks + 3) / 4, groups = (((1 << bs2_log2) - 1 + blocks - 1) >> bs2_log2) + 1;
  return {code_words, code_words + groups};
}

__host__ __device__ __forceinline__ int stage_bytes(StageLayout l) { return kGemvRows * (kStageK / 2 + 4 * l.words); }

template <int MT, bool kLora>
struct GemvShared {
  LaneTable pairs;  // code byte -> its two NF4 values in T (the high nibble, the lower k, in the low half)
  Tables t;
  float partial[2][kGemvWarps][MT][kGemvRows];  // each warp's sums of the tile's rows, double-buffered over tiles
  // GemvShrink: this CTA's share of v so far (lane j of the last warp owns entries j, j + 32, ... of each row), and
  // each row of x's adapter (-1: none) and its rank at the next projection
  float shrunk[kLora ? MT : 1][kLora ? kGemvShrinkMaxRank : 1];
  int shrink_adapter[MT], shrink_rank[MT];
};

// The pool slot of the segment holding row m of x, or -1 (none, or a slot outside the pool).
__device__ __forceinline__ int row_adapter(const GemvLora& l, int m) {
  return lora::cuda::segment_adapter(l.seg_starts, l.seg_slots, l.segments, l.pool.slots, m);
}

// The scaled LoRA delta of output column n for row m of x over the adapter's rank rows first, first + stride, ...
template <typename T>
__device__ __forceinline__ float lora_part(const GemvLora& l, int adapter, int m, int64_t n, int first, int stride) {
  int i = 0;  // the module whose columns hold n
  while (i + 1 < l.mods.count && n >= l.mods.column[i + 1]) ++i;
  lora::cuda::Pool p = l.pool;
  p.module = l.mods.index[i];
  const int rank = p.ranks[lora::cuda::layer_module(p, adapter)];
  const int64_t o = n - l.mods.column[i];
  const T* arena = static_cast<const T*>(p.arena);
  const int64_t chunk = o >> p.page_log2, in_page = o & ((int64_t{1} << p.page_log2) - 1);
  const float* v = l.v + m * l.v_stride + i * l.max_rank;
  float part = 0.0f;
  for (int j = first; j < rank; j += stride) {
    const int64_t page = lora::cuda::row_pages(p, adapter, 1, j)[chunk];
    part = fmaf(v[j], to_float(arena[(page << p.page_log2) + in_page]), part);
  }
  return part * l.scales[adapter];
}

// Paired tiles: a tile holds 8 pairs of rows, pair i (of N / 2) being a row and the one `half` further:
// silu_mul's gate row i and up row N/2 + i (half = N / 2, shift -1); rotary's rows d and d + D/2 of head h, for
// i = h * D/2 + d (half = D / 2 = 2^shift). Without pairs (half = 0) a tile is 16 consecutive rows.
struct Pairing {
  int half, shift;
};

__host__ __device__ __forceinline__ Pairing pairing(int N, bool silu_mul, int head_dim) {
  if (silu_mul) return {N / 2, -1};
  if (head_dim == 0) return {0, -1};
  int shift = 0;
  while ((2 << shift) < head_dim) ++shift;
  return {head_dim / 2, shift};
}

// The GEMV's tiles: 16 weight rows each, or 8 pairs.
__host__ __device__ __forceinline__ int gemv_tiles(int N, Pairing p) {
  return p.half > 0 ? (N / 2 + 7) / 8 : (N + kGemvRows - 1) / kGemvRows;
}

// The weight row of A row g (0..7) or g + 8 (second) of a tile: row g + 8 * second of 16 consecutive rows, or the
// first (g) or second row of pair 8 * tile + g. Past the last output it is the last row again (read, not written).
// Rows fit 32 bits (gemm_supported: N * K < 2^31).
__device__ __forceinline__ int gemv_row(int tile, int g, bool second, int N, Pairing p) {
  if (p.half == 0) return min(tile * kGemvRows + g + (second ? 8 : 0), N - 1);
  const int i = min(tile * 8 + g, N / 2 - 1);
  const int first = p.shift < 0 ? i : ((i >> p.shift) << (p.shift + 1)) + (i & (p.half - 1));
  return first + (second ? p.half : 0);
}

// The codes of A row `lane` of a tile, from L2 (a bulk request). Not inlined, as prefetch_absmax.
__device__ __noinline__ void prefetch_codes(const uint8_t* codes, int K, int N, Pairing layout, int tile, int lane) {
  // element indices fit 32 bits (gemm_supported)
  prefetch_l2_bulk(codes + static_cast<uint32_t>(gemv_row(tile, lane % 8, lane >= 8, N, layout)) * (K / 2), K / 2);
}

// The absmax of A row `lane` of each of this CTA's tiles, from L2 (a bulk request a row). Not inlined: the GEMV's
// registers are few, and this runs once.
__device__ __noinline__ void prefetch_absmax(const void* absmax, uint32_t size, int K, int bs_log2, int N,
                                             Pairing layout, int my_tiles, int lane) {
  for (int r = 0; r < my_tiles; ++r) {  // element indices fit 32 bits (gemm_supported)
    const int tile = static_cast<int>(blockIdx.x + r * gridDim.x);
    const uint32_t e0 = static_cast<uint32_t>(gemv_row(tile, lane % 8, lane >= 8, N, layout)) * K;
    const uint32_t b0 = e0 >> bs_log2, blocks = ((e0 + K - 1) >> bs_log2) - b0 + 1;  // the row's blocks
    prefetch_l2_bulk(static_cast<const uint8_t*>(absmax) + b0 * size, blocks * size);
  }
}

// GemvShrink's share of one tile: its SwiGLU outputs i0 .. i0 + 7 (i0 = 8 * tile, those below `half`) times the
// next projection's A rows, for rows base and base + 1 of x. Lane l of the last warp holds h, row base + l / 16's
// output i0 + l % 16 (lanes with l % 16 >= 8 hold nothing). Lane j adds into shrunk[m][j], [j + 32], ... Not
// inlined: inlined, its registers cost the 1-row GEMV's hot loop a spill (sass_loops.py).
template <typename T, int MT, bool kLora>
__device__ __noinline__ void shrink_tile(const GemvShrink& s, GemvShared<MT, kLora>& sh, int tile, int base, float h,
                                         int M, int half, int lane) {
  const lora::cuda::Pool& p = s.pool;
  const int i0 = tile * 8;
  const int64_t chunk = i0 >> p.page_log2, in_page = i0 & ((int64_t{1} << p.page_log2) - 1);
  const T* arena = static_cast<const T*>(p.arena);
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    float hv[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) hv[e] = __shfl_sync(0xffffffffu, h, 16 * u + e);
    const int m = base + u;
    if (m >= M || m >= MT) continue;
    const int adapter = sh.shrink_adapter[m];
    for (int j = lane; j < sh.shrink_rank[m]; j += 32) {  // 8 values in one page (page_size >= 8): a 16-byte load
      const int64_t page = lora::cuda::row_pages(p, adapter, 0, j)[chunk];
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(arena + (page << p.page_log2) + in_page));
      const T* a = reinterpret_cast<const T*>(&raw);
      float part = 0.0f;
#pragma unroll
      for (int e = 0; e < 8; ++e)
        if (i0 + e < half) part = fmaf(hv[e], to_float(a[e]), part);  // past the row: another row's or no data
      sh.shrunk[m][j] += part;
    }
  }
}

// GemvShrink's end, for every thread of the CTA after its last tile: its share to partials, then the last CTA to get
// there sums every CTA's share in CTA order into v (CUDA's threadFenceReduction pattern, as decode attention merges
// its splits). scratch: blockDim.x floats.
template <int MT, bool kLora>
__device__ __forceinline__ void shrink_finish(const GemvShrink& s, const GemvShared<MT, kLora>& sh, int M,
                                              float* scratch) {
  __shared__ bool last;
  const int R = static_cast<int>(s.pool.max_rank_table), cols = M * R, tid = threadIdx.x;
  __syncthreads();  // the last warp's shares are in
  for (int c = tid; c < cols; c += blockDim.x) s.partials[int64_t{blockIdx.x} * cols + c] = sh.shrunk[c / R][c % R];
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    last = atomicAdd(s.counter, 1) == static_cast<int>(gridDim.x) - 1;
    if (last) *s.counter = 0;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int* ranks = sh.shrink_rank;
  int W = 0;  // the widest rank of the rows: only those columns have anything to sum
  for (int m = 0; m < M; ++m) W = max(W, ranks[m]);
  for (int c = tid; c < cols; c += blockDim.x)  // the rest of v is zero
    if (c % R >= W) s.v[c] = 0.0f;
  if (W == 0) return;
  int per = 1;  // threads a column: a power of two
  while (per * 2 * M * W <= static_cast<int>(blockDim.x)) per *= 2;
  const int width = static_cast<int>(blockDim.x) / per;  // columns a round
  for (int c0 = 0; c0 < M * W; c0 += width) {
    const int c = c0 + tid / per, q = tid % per, m = c / W, j = c % W;
    float sum = 0.0f;
    if (c < M * W && j < ranks[m]) {
      for (int b = q; b < static_cast<int>(gridDim.x); b += per)
        sum += __ldcg(s.partials + int64_t{b} * cols + m * R + j);  // other CTAs' writes: from L2, not L1
    }
    scratch[tid] = sum;
    __syncthreads();
    if (q == 0 && c < M * W) {
      float total = 0.0f;
      for (int i = 0; i < per; ++i) total += scratch[tid + i];
      s.v[m * R + j] = total;
    }
    __syncthreads();
  }
}

template <typename T, int MT, bool kLora, AbsmaxKind kAbsmax, bool kStaged>
__global__ void __launch_bounds__(kGemvWarps * 32, kGemvCtasPerSm<MT>)
    gemv_kernel(const T* __restrict__ x, int M, int K, const uint8_t* __restrict__ codes, AbsmaxArgs a, int bs_log2,
                int N, const T* __restrict__ bias, GemvLora lora, bool silu_mul, GemvRope rope, GemvShrink shrink,
                T* __restrict__ y) {
  static_assert(MT == 1 || MT == 2 || MT == 4 || MT == 8, "rows of x: 1, 2, 4 or 8 (fewer are padding)");
  constexpr bool kDq = kAbsmax != AbsmaxKind::kFp32;  // double-quantized
  constexpr int kGroups = (MT + 1) / 2;  // mmas per A fragment: rows 2p, 2p + 1 of x in C columns 2t, 2t + 1
  __shared__ GemvShared<MT, kLora> sh;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, tq = lane % 4;
  const int chunks = K / 32, steps = (chunks + 3) / 4;
  const Pairing layout = pairing(N, silu_mul, rope.head_dim);
  const int tiles = gemv_tiles(N, layout);
  // This warp's steps of a tile: warp, warp + 8, ... (none when the tile has fewer steps than warps).
  const int mine = warp < steps ? (steps - warp + kGemvWarps - 1) / kGemvWarps : 0;
  const int my_tiles = (tiles - static_cast<int>(blockIdx.x) + gridDim.x - 1) / gridDim.x;

  // Staged: the CTA's stages are its tiles' k-stages in order, stage q in slot q % kGemvStages.
  extern __shared__ uint4 gemv_stages[];
  const StageLayout sl = stage_layout(bs_log2, a.blocksize2_log2, kDq);
  const int slot_bytes = stage_bytes(sl), tile_stages = (K + kStageK - 1) / kStageK;
  auto slot = [&](int q) { return reinterpret_cast<unsigned char*>(gemv_stages) + (q % kGemvStages<MT>)*slot_bytes; };
  // The next stage to copy: stage is_q, tile `is_r` of this CTA and its k-stage is_ks (counted, not divided out);
  // and the first elements of the rows whose codes this thread copies (warp, warp + 8), and whose absmax
  // (threadIdx.x % 16: 256 threads a round, so the same row every round), in that tile.
  int is_q = 0, is_r = 0, is_ks = 0;
  uint32_t is_e0 = 0, is_e1 = 0, is_ea = 0;
  // Every thread's copies of the next stage (none past the last), one cp.async group (empty past the last).
  auto issue_next = [&] {
    if (is_r < my_tiles) {
      if (is_ks == 0) {
        const int tile = static_cast<int>(blockIdx.x + is_r * gridDim.x), r = threadIdx.x % kGemvRows;
        is_e0 = static_cast<uint32_t>(gemv_row(tile, warp, false, N, layout)) * K;
        is_e1 = static_cast<uint32_t>(gemv_row(tile, warp, true, N, layout)) * K;
        is_ea = static_cast<uint32_t>(gemv_row(tile, r % 8, r >= 8, N, layout)) * K;
      }
      const int k0 = is_ks * kStageK, len = min(kStageK, K - k0);  // len: a multiple of 32
      unsigned char* to = slot(is_q);
      if (32 * lane < len) {  // chunk `lane` of rows warp and warp + 8 (of one parity)
        const int at = lane ^ ((warp & 1) << 2);
        cp_async_16(to + 16 * (warp * kStageChunks + at), codes + (is_e0 + k0 + 32 * lane) / 2);
        cp_async_16(to + 16 * ((warp + 8) * kStageChunks + at), codes + (is_e1 + k0 + 32 * lane) / 2);
      }
      uint32_t* words = reinterpret_cast<uint32_t*>(to + kGemvRows * kStageK / 2);
      const uint32_t b0 = (is_ea + k0) >> bs_log2, b1 = (is_ea + k0 + len - 1) >> bs_log2;  // the row's blocks
#pragma unroll 1
      for (uint32_t i = threadIdx.x; i < static_cast<uint32_t>(kGemvRows * sl.words); i += kGemvWarps * 32) {  // 1-2
        const uint32_t w = i / kGemvRows;
        if constexpr (!kDq) {
          if (b0 + w <= b1) cp_async_4(words + i, static_cast<const float*>(a.absmax) + b0 + w);
        } else if (w < static_cast<uint32_t>(sl.code_words)) {
          const uint32_t at = (b0 & ~3u) + 4 * w;  // a block: the first of the word
          const uint8_t* from = static_cast<const uint8_t*>(a.absmax) + at;
          const uint32_t blocks = ((static_cast<uint32_t>(N) * K - 1) >> bs_log2) + 1;  // N * K < 2^31
          if (at + 4 <= blocks) {
            if (at <= b1) cp_async_4(words + i, from);
          } else if (at <= b1) {  // the absmax's last word, past its end: its bytes one by one
            uint32_t v = 0;
            for (uint32_t j = 0; at + j < blocks; ++j) v |= static_cast<uint32_t>(__ldg(from + j)) << (8 * j);
            words[i] = v;
          }
        } else {
          const uint32_t group = (b0 >> a.blocksize2_log2) + (w - sl.code_words);
          if (group <= b1 >> a.blocksize2_log2) cp_async_4(words + i, a.absmax2 + group);
        }
      }
      ++is_q;
      if (++is_ks == tile_stages) {
        is_ks = 0;
        ++is_r;
      }
    }
    cp_async_commit();
  };
  if constexpr (kStaged) {
    for (int q = 0; q + 1 < kGemvStages<MT>; ++q) issue_next();  // weights only: before the PDL wait
  }

  // Lane l < 16 of the first warp asks L2 for A row l of a tile's codes, a bulk request: of the first tile here, of
  // the next one as each tile starts, so DRAM streams on while the registers' loads run a step ahead. Here it also
  // asks for the absmax of its rows of every tile of this CTA (a few KB a tile, kept in L2 as the codes stream
  // through it): without it, each step's absmax load is a DRAM round trip.
  auto prefetch_tile = [&](int tile) {
    if (warp == 0 && lane < kGemvRows) prefetch_codes(codes, K, N, layout, tile, lane);
  };
  prefetch_tile(blockIdx.x);
  if (warp == 0 && lane < kGemvRows) prefetch_absmax(a.absmax, kDq ? 1 : 4, K, bs_log2, N, layout, my_tiles, lane);
  {
    constexpr float kValues[kNumCodes] = LORAX_NF4_VALUES;
    for (int u = threadIdx.x; u < 256 * 8; u += blockDim.x) {  // 16 bytes at a time: 4 lanes' copies of byte u / 8
      const int byte = u / 8;
      const uint32_t p = pack2<T>(kValues[byte >> 4], kValues[byte & 0xF]);
      reinterpret_cast<uint4*>(sh.pairs.copies)[u] = make_uint4(p, p, p, p);
    }
  }
  if constexpr (kLora) {
    for (int i = threadIdx.x; i < MT * kGemvShrinkMaxRank; i += blockDim.x) (&sh.shrunk[0][0])[i] = 0.0f;
  }
  load_tables(sh.t, a);  // its barrier also publishes the pairs and the zeros

  // What a step needs from memory, loaded a step ahead (across tiles too).
  struct Stage {
    uint4 q0, q1;      // the lane's chunk of codes in rows g and g + 8
    RawAbsmax s0, s1;  // their absmax
  };
  // The loader's place: its tile and step, and the chunk and element index of the step in rows g and g + 8. A step
  // moves on by 32 chunks. Past k, a lane loads lane (g, 0)'s chunk again (chunk 4s is inside k for every step
  // s < steps): its x is zero, so it adds nothing. After the last step it loads the last tile's steps again
  // (unused), so that every step's load is unconditional.
  // Element indices fit 32 bits (gemm_supported: N * K < 2^31).
  constexpr int kStride = 4 * kGemvWarps;  // chunks
  int ld_r = 0, ld_j = 0, ld_c = 0;
  uint32_t ld_e0 = 0, ld_e1 = 0;
  auto loader_rows = [&] {
    const int tile = static_cast<int>(blockIdx.x + min(ld_r, my_tiles - 1) * gridDim.x);
    ld_c = 4 * warp + tq;
    ld_e0 = static_cast<uint32_t>(gemv_row(tile, g, false, N, layout)) * K + 32 * ld_c;
    ld_e1 = static_cast<uint32_t>(gemv_row(tile, g, true, N, layout)) * K + 32 * ld_c;
  };
  auto load_next = [&] {
    const uint32_t back = ld_c < chunks ? 0u : 32u * tq;
    const uint32_t e0 = ld_e0 - back, e1 = ld_e1 - back;
    Stage st;
    st.q0 = __ldcs(reinterpret_cast<const uint4*>(codes + (e0 >> 1)));
    st.q1 = __ldcs(reinterpret_cast<const uint4*>(codes + (e1 >> 1)));
    st.s0 = load_absmax<kAbsmax>(a, e0 >> bs_log2);
    st.s1 = load_absmax<kAbsmax>(a, e1 >> bs_log2);
    ld_c += kStride;
    ld_e0 += 32 * kStride;
    ld_e1 += 32 * kStride;
    if (++ld_j == mine) {
      ld_j = 0;
      ++ld_r;
      loader_rows();
    }
    return st;
  };

  const LaneColumn pairs = lane_column(sh.pairs, lane);
  // Lane (2t + u, t), u = 0 or 1, holds B column 2t + u: x row 2p + u of mma p on lane t's chunk (u = 1 only with
  // more than one row of x); every other B value is zero.
  const int u = g - 2 * tq;
  const bool holds_x = u == 0 || (MT > 1 && u == 1);
  // The A fragment of bytes 2m, 2m + 1 of the lane's chunk in rows g and g + 8: k = 32c + 4m + {0, 1}, {2, 3}.
  auto fragment = [&](const Stage& st, int m, uint32_t (&frag)[4]) {
    const uint32_t w0 = word_of(st.q0, m / 2), w1 = word_of(st.q1, m / 2);
    const int i = 2 * (m % 2);
    frag[0] = lane_lookup(pairs, w0, i);
    frag[1] = lane_lookup(pairs, w1, i);
    frag[2] = lane_lookup(pairs, w0, i + 1);
    frag[3] = lane_lookup(pairs, w1, i + 1);
  };
  // One step: this lane's chunk's dot products with rows g and g + 8 of the weight, for each row of x, scaled and
  // added to acc[p] = {(g, 2p), (g, 2p + 1), (g + 8, 2p), (g + 8, 2p + 1)} as (weight row, row of x).
  auto compute = [&](const Stage& st, int c, float (&acc)[kGroups][4]) {
    const float s0 = decode_absmax<kAbsmax>(a, sh.t, st.s0), s1 = decode_absmax<kAbsmax>(a, sh.t, st.s1);
    uint32_t frags[MT == 1 ? 1 : 8][4];  // with more rows of x, the step's 8 fragments serve each pair of them
    if constexpr (MT > 1) {
#pragma unroll
      for (int m = 0; m < 8; ++m) fragment(st, m, frags[m]);
    }
#pragma unroll
    for (int p = 0; p < kGroups; ++p) {
      uint4 xv[4] = {};
      if (holds_x && 2 * p + u < M && c < chunks) {
        const T* row = x + int64_t{2 * p + u} * K + 32 * int64_t{c};
#pragma unroll
        for (int i = 0; i < 4; ++i) xv[i] = __ldg(reinterpret_cast<const uint4*>(row) + i);
      }
      float cc[2][4] = {};  // two mma chains; C columns 2t, 2t + 1 hold this lane's chunk
#pragma unroll
      for (int m = 0; m < 8; ++m) {
        if constexpr (MT == 1) fragment(st, m, frags[0]);
        mma_m16n8k16<T>(cc[m % 2], frags[MT == 1 ? 0 : m], word_of(xv[m / 2], (2 * m) % 4),
                        word_of(xv[m / 2], (2 * m + 1) % 4));
      }
      acc[p][0] = fmaf(s0, cc[0][0] + cc[1][0], acc[p][0]);
      acc[p][2] = fmaf(s1, cc[0][2] + cc[1][2], acc[p][2]);
      if constexpr (MT > 1) {
        acc[p][1] = fmaf(s0, cc[0][1] + cc[1][1], acc[p][1]);
        acc[p][3] = fmaf(s1, cc[0][3] + cc[1][3], acc[p][3]);
      }
    }
  };

  // The absmax of the block holding chunk cs of a stage of row r (its first element e) in its slot; zero for lanes
  // past k, whose slot bytes may be anything (x is zero there: the scale must be finite).
  auto staged_absmax = [&](const uint32_t* words, int r, uint32_t e, int cs, bool live) -> RawAbsmax {
    if (!live) return {0u, 0.0f};
    const uint32_t b0 = e >> bs_log2, b = (e + 32 * cs) >> bs_log2;
    if constexpr (!kDq) {
      return {words[(b - b0) * kGemvRows + r], 0.0f};
    } else {
      const uint32_t at = b - (b0 & ~3u), group = (b >> a.blocksize2_log2) - (b0 >> a.blocksize2_log2);
      const uint32_t code = (words[(at / 4) * kGemvRows + r] >> (8 * (at % 4))) & 0xFFu;
      return {kAbsmax == AbsmaxKind::kParts ? code | absmax_part(a, b >> a.blocksize2_log2) << 8 : code,
              __uint_as_float(words[(sl.code_words + group) * kGemvRows + r])};
    }
  };
  // Staged: this warp's step of stage q (k from k0), rows g and g + 8 of its tile starting at elements e0 and e1.
  auto compute_staged = [&](int q, int k0, uint32_t e0, uint32_t e1, float(&acc)[kGroups][4]) {
    const int len = min(kStageK, K - k0);
    if (128 * warp >= len) return;  // the warp's step is past k (whole warps: the mma needs them)
    const unsigned char* from = slot(q);
    const uint4* q16 = reinterpret_cast<const uint4*>(from);
    const uint32_t* words = reinterpret_cast<const uint32_t*>(from + kGemvRows * kStageK / 2);
    const int cs = 4 * warp + tq, at = cs ^ ((g & 1) << 2);  // rows g and g + 8 have one parity
    const bool live = 32 * cs < len;
    Stage st;
    st.q0 = q16[g * kStageChunks + at];
    st.q1 = q16[(g + 8) * kStageChunks + at];
    st.s0 = staged_absmax(words, g, e0 + k0, cs, live);
    st.s1 = staged_absmax(words, g + 8, e1 + k0, cs, live);
    compute(st, k0 / 32 + cs, acc);
  };

  // The steps loaded ahead: one at one row of x (at its 80 registers a second one spills in the loop), else two.
  constexpr bool kTwoAhead = MT > 1;
  Stage cur, ahead;
  if (!kStaged && mine > 0) {
    loader_rows();
    cur = load_next();
    if constexpr (kTwoAhead) ahead = load_next();
  }
  // Everything above reads weights only, which no kernel writes: with PDL it overlaps the kernel before this one.
  // x, the LoRA's v and the outputs wait for it.
  pdl_prologue();
  if constexpr (kLora) {  // published by the first tile's barrier
    if (shrink.v != nullptr && threadIdx.x < M) {
      const int adapter = row_adapter(lora, threadIdx.x);
      sh.shrink_adapter[threadIdx.x] = adapter;
      sh.shrink_rank[threadIdx.x] =
          min(lora::cuda::adapter_rank(shrink.pool, adapter), static_cast<int>(shrink.pool.max_rank_table));
    }
  }
  for (int r = 0; r < my_tiles; ++r) {
    const int tile = static_cast<int>(blockIdx.x + r * gridDim.x);
    float acc[kGroups][4] = {};   // see compute
    float delta[kLora ? MT : 1] = {};  // lane l: its share of the LoRA delta of tile row l % 16, per row of x
    auto lora_share = [&] {
      if constexpr (kLora) {
        const int row = lane % kGemvRows;
        const int n = gemv_row(tile, row % 8, row >= 8, N, layout);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const int adapter = m < M ? row_adapter(lora, m) : -1;
          if (adapter >= 0)
            delta[m] = lora_part<T>(lora, adapter, m, n, 2 * warp + lane / kGemvRows, 2 * kGemvWarps);
        }
      }
    };
    if (r + 1 < my_tiles) prefetch_tile(tile + gridDim.x);
    if constexpr (kStaged) {
      const uint32_t e0 = static_cast<uint32_t>(gemv_row(tile, g, false, N, layout)) * K;
      const uint32_t e1 = static_cast<uint32_t>(gemv_row(tile, g, true, N, layout)) * K;
      for (int ks = 0; ks < tile_stages; ++ks) {
        const int q = r * tile_stages + ks;
        cp_async_wait<kGemvStages<MT> - 2>();  // this thread's copies of stage q have landed
        __syncthreads();  // and every thread's; every warp is done with stage q - 1, whose slot the next takes
        issue_next();  // stage q + kGemvStages - 1
        if (ks == 0) lora_share();  // its loads overlap the stage's
        compute_staged(q, ks * kStageK, e0, e1, acc);
      }
    } else {
      if (mine == 0) lora_share();
#pragma unroll 2
      for (int j = 0; j < mine; ++j) {
        const Stage next = load_next();
        if (j == 0) lora_share();  // its loads overlap the codes'
        compute(cur, 4 * (warp + kGemvWarps * j) + tq, acc);
        if constexpr (kTwoAhead) {
          cur = ahead;
          ahead = next;
        } else {
          cur = next;
        }
      }
    }

    // The tile's sums: over the quad's chunks (shuffles), the LoRA share's lanes, then the warps (shared memory).
#pragma unroll
    for (int p = 0; p < kGroups; ++p)
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int offset = 1; offset <= 2; offset *= 2) acc[p][i] += __shfl_xor_sync(0xffffffffu, acc[p][i], offset);
    if constexpr (kLora) {
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float d = delta[m] + __shfl_xor_sync(0xffffffffu, delta[m], kGemvRows);  // lanes l, l + 16: row l
        acc[m / 2][m % 2] += __shfl_sync(0xffffffffu, d, g);
        acc[m / 2][2 + m % 2] += __shfl_sync(0xffffffffu, d, g + 8);
      }
    }
    float(&part)[kGemvWarps][MT][kGemvRows] = sh.partial[r % 2];
    if (tq == 0) {
#pragma unroll
      for (int p = 0; p < kGroups; ++p)
#pragma unroll
        for (int v = 0; v < 2; ++v) {  // row 2p + v of x
          if (2 * p + v < MT) {
            part[warp][2 * p + v][g] = acc[p][v];
            part[warp][2 * p + v][g + 8] = acc[p][2 + v];
          }
        }
    }
    __syncthreads();  // (the other buffer is free: every warp has passed the last tile's reads)
    if (warp != kGemvWarps - 1) continue;  // the last warp, with the fewest steps, finishes the tile
    const int row = lane % kGemvRows;
    const int n = gemv_row(tile, row % 8, row >= 8, N, layout);
    const float b = bias != nullptr ? to_float(bias[n]) : 0.0f;
    auto output = [&](int m) {  // row m of x's result for weight row n (its one rounding is the caller's)
      float out = 0.0f;
#pragma unroll
      for (int w = 0; w < kGemvWarps; ++w) out += part[w][m][row];
      return out + b;
    };
    if (silu_mul) {  // lanes 0-15 take even rows of x, 16-31 odd ones; lane l's up row is lane l + 8's
      const int i = tile * 8 + row;
      for (int base = 0; base < MT; base += 2) {
        const int m = base + lane / kGemvRows;
        const float out = m < M ? output(m) : 0.0f, up = __shfl_sync(0xffffffffu, out, (lane + 8) % 32);
        float h = 0.0f;
        if (row < 8 && m < M && i < layout.half) {
          const T value = silu_mul_rounded<T>(rounded<T>(out), rounded<T>(up));
          y[m * layout.half + i] = value;
          h = to_float(value);
        }
        if constexpr (kLora) {
          if (shrink.v != nullptr) shrink_tile<T>(shrink, sh, tile, base, h, M, layout.half, lane);
        }
      }
    } else if (layout.half > 0) {  // rotary: lane l holds element d (row < 8) or d + D/2 of a head, l ^ 8 the other
      const int D = rope.head_dim, d = n & (D - 1), head = n >> (layout.shift + 1);
      const int q_size = rope.q_heads * D, kv_size = rope.kv_heads * D;
      const bool live = tile * 8 + row % 8 < N / 2, rotates = head < rope.q_heads + rope.kv_heads;
      const T* cos = static_cast<const T*>(rope.cos);
      const T* sin = static_cast<const T*>(rope.sin);
      for (int base = 0; base < MT; base += 2) {
        const int m = base + lane / kGemvRows;
        const float out = m < M ? rounded<T>(output(m)) : 0.0f, other = __shfl_xor_sync(0xffffffffu, out, 8);
        if (!live || m >= M) continue;
        T value = from_float<T>(out);
        if (rotates) {
          const int64_t at = rope.positions[m] * D + d;
          value = rotary_rounded<T>(out, other, to_float(cos[at]), to_float(sin[at]), row >= 8);
        }
        y[int64_t{m} * N + n] = value;
        const int64_t slot = rope.slots[m];
        if (slot >= 0 && head >= rope.q_heads) {
          const bool is_v = n >= q_size + kv_size;
          T* cache = static_cast<T*>(is_v ? rope.v_cache : rope.k_cache);
          cache[slot * kv_size + (n - q_size - (is_v ? kv_size : 0))] = value;
        }
      }
    } else if (tile * kGemvRows + row < N) {
      for (int m = lane / kGemvRows; m < M; m += 2) y[int64_t{m} * N + n] = from_float<T>(output(m));
    }
  }
  if constexpr (kLora) {
    if (shrink.v != nullptr) shrink_finish(shrink, sh, M, &sh.partial[0][0][0][0]);
  }
}

std::atomic<bool> g_gemv_staging{false};  // set_gemv_staging

int grid_for(int64_t items, int threads) {
  return static_cast<int>(std::min<int64_t>((items + threads - 1) / threads, int64_t{1} << 20));
}

struct SplitPlan {
  int splits, kt_per_split;
};

SplitPlan plan_splits(int64_t N, int64_t K, int num_sms) {
  const int64_t row_tiles = N / kTileN, k_tiles = K / kTileK;
  const int64_t target_ctas = int64_t{num_sms} * 8;
  int64_t splits = std::clamp<int64_t>((target_ctas + row_tiles - 1) / row_tiles, 1,
                                       std::max<int64_t>(1, k_tiles / kWarps));
  const int64_t per = (k_tiles + splits - 1) / splits;
  return {static_cast<int>((k_tiles + per - 1) / per), static_cast<int>(per)};
}

template <typename T, int NT>
void launch_gemm(const T* x, int M, int K, const uint8_t* codes, const AbsmaxArgs& a, int bs_log2, int N,
                 const T* bias, float* ws, int num_sms, T* y, cudaStream_t stream) {
  const SplitPlan p = plan_splits(N, K, num_sms);
  dim3 grid(N / kTileN, p.splits);
  launch(gemm_kernel<T, NT>, grid, kWarps * 32, 0, stream, x, M, K, codes, a, bs_log2, N, p.kt_per_split, ws);
  const int64_t MN = int64_t{M} * N;
  launch(splitk_epilogue_kernel<T>, grid_for(MN, 256), 256, 0, stream, ws, p.splits, MN, N, bias, y);
}

// The GEMV for M <= kGemvMaxM rows of x: the kernel instance for 1, 2, 4 or 8 rows that holds them.
template <typename T, bool kLora>
void launch_gemv(const T* x, int M, int K, const uint8_t* codes, const AbsmaxArgs& a, int bs_log2, int N,
                 const T* bias, const GemvLora& lora, bool silu_mul, const GemvRope& rope, const GemvShrink& shrink,
                 T* y, int num_sms, cudaStream_t stream) {
  auto run = [&](auto mt) {
    constexpr int MT = decltype(mt)::value;
    const int tiles = gemv_tiles(N, pairing(N, silu_mul, rope.head_dim));
    const int64_t grid = std::min<int64_t>(tiles, int64_t{num_sms} * kGemvCtasPerSm<MT>);
    const bool dq = a.code2 != nullptr, staged = g_gemv_staging.load(std::memory_order_relaxed);
    auto instance = [&](auto kind) {
      constexpr AbsmaxKind kKind = decltype(kind)::value;
      return staged ? gemv_kernel<T, MT, kLora, kKind, true> : gemv_kernel<T, MT, kLora, kKind, false>;
    };
    using Kind = AbsmaxKind;
    const Kind kind = absmax_kind(a);
    auto kernel = kind == Kind::kFp32     ? instance(std::integral_constant<Kind, Kind::kFp32>{})
                  : kind == Kind::kNested ? instance(std::integral_constant<Kind, Kind::kNested>{})
                                          : instance(std::integral_constant<Kind, Kind::kParts>{});
    const size_t smem = staged ? kGemvStages<MT> * stage_bytes(stage_layout(bs_log2, a.blocksize2_log2, dq)) : 0;
    if (smem > 0) allow_dynamic_shared(reinterpret_cast<const void*>(kernel), smem);
    launch(kernel, static_cast<int>(grid), kGemvWarps * 32, smem, stream, x, M, K, codes, a, bs_log2, N, bias, lora,
           silu_mul, rope, shrink, y);
  };
  static_assert(kGemvMaxM == 8, "launch_gemv instantiates the GEMV for 1, 2, 4 and 8 rows");
  if (M == 1) run(std::integral_constant<int, 1>{});
  else if (M == 2) run(std::integral_constant<int, 2>{});
  else if (M <= 4) run(std::integral_constant<int, 4>{});
  else run(std::integral_constant<int, 8>{});
}

template <typename T>
void dispatch_gemm(const void* x_, int64_t M, int64_t K, const uint8_t* codes, const AbsmaxArgs& a, int bs_log2,
                   int64_t N, const void* bias_, float* ws, int num_sms, void* y_, cudaStream_t stream) {
  const T *x = static_cast<const T*>(x_), *bias = static_cast<const T*>(bias_);
  T* y = static_cast<T*>(y_);
  auto gemm = [&](auto nt) {
    launch_gemm<T, decltype(nt)::value>(x, M, K, codes, a, bs_log2, N, bias, ws, num_sms, y, stream);
  };
  if (M <= kGemvMaxM)
    launch_gemv<T, false>(x, static_cast<int>(M), K, codes, a, bs_log2, N, bias, GemvLora{}, false, GemvRope{},
                          GemvShrink{}, y, num_sms, stream);
  else if (M <= 16) gemm(std::integral_constant<int, 2>{});
  else gemm(std::integral_constant<int, 4>{});
}

}  // namespace

void quantize(const float* x, int64_t n, int blocksize_log2, uint8_t* codes, float* absmax, cudaStream_t stream) {
  const int64_t blocks = (n + (int64_t{1} << blocksize_log2) - 1) >> blocksize_log2;
  constexpr int kThreads = 256, kBlocksPerCta = kThreads / 32;
  launch(quantize_kernel, (blocks + kBlocksPerCta - 1) / kBlocksPerCta, kThreads, 0, stream, x, n, blocksize_log2,
         blocks, codes, absmax);
}

void quantize_absmax(const float* absmax, int64_t n, const float* code, int64_t blocksize, uint8_t* q,
                     float* absmax2, cudaStream_t stream) {
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  launch(quantize_absmax_kernel, blocks, 256, 0, stream, absmax, n, code, blocksize, q, absmax2);
}

void dequantize_absmax(const AbsmaxArgs& a, int64_t blocks, float* out, cudaStream_t stream) {
  launch(dequantize_absmax_kernel, grid_for(blocks, 256), 256, 0, stream, a, blocks, out);
}

void dequantize(const uint8_t* codes, const AbsmaxArgs& a, int blocksize_log2, int64_t n, DType dtype, void* out,
                cudaStream_t stream) {
  const int grid = grid_for((n + 7) / 8, 256);
  with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    launch(dequantize_kernel<T>, grid, 256, 0, stream, codes, a, blocksize_log2, n, static_cast<T*>(out));
  });
}

bool set_gemv_staging(bool staged) { return g_gemv_staging.exchange(staged); }

bool gemm_supported(int64_t M, int64_t N, int64_t K, DType dtype) {
  if (dtype == DType::kFloat || M < 1 || N < 1 || N > (int64_t{1} << 30) || K > (int64_t{1} << 30)) return false;
  if (M <= kGemvMaxM) return K % 32 == 0 && N * K < (int64_t{1} << 31);  // the GEMV's element indices: 32 bits
  return M <= kGemmMaxM && N % kTileN == 0 && K % kTileK == 0;
}

int64_t gemm_workspace_floats(int64_t M, int64_t N, int64_t K, int num_sms) {
  return M <= kGemvMaxM ? 0 : int64_t{plan_splits(N, K, num_sms).splits} * M * N;
}

void gemm(const void* x, DType dtype, int64_t M, int64_t K, const uint8_t* codes, const AbsmaxArgs& a,
          int blocksize_log2, int64_t N, const void* bias, float* workspace, int num_sms, void* y,
          cudaStream_t stream) {
  if (dtype == DType::kBFloat16)
    dispatch_gemm<__nv_bfloat16>(x, M, K, codes, a, blocksize_log2, N, bias, workspace, num_sms, y, stream);
  else
    dispatch_gemm<__half>(x, M, K, codes, a, blocksize_log2, N, bias, workspace, num_sms, y, stream);
}

void gemv(const void* x, DType dtype, int64_t M, int64_t K, const uint8_t* codes, const AbsmaxArgs& a,
          int blocksize_log2, int64_t N, const void* bias, const GemvLora* lora, bool silu_mul, const GemvRope* rope,
          const GemvShrink* shrink, void* y, int num_sms, cudaStream_t stream) {
  auto run = [&](auto t) {
    using T = decltype(t);
    const T *xt = static_cast<const T*>(x), *b = static_cast<const T*>(bias);
    T* yt = static_cast<T*>(y);
    const int m = static_cast<int>(M);
    const GemvRope r = rope != nullptr ? *rope : GemvRope{};
    const GemvShrink s = shrink != nullptr && lora != nullptr && silu_mul ? *shrink : GemvShrink{};
    if (lora != nullptr)
      launch_gemv<T, true>(xt, m, K, codes, a, blocksize_log2, N, b, *lora, silu_mul, r, s, yt, num_sms, stream);
    else
      launch_gemv<T, false>(xt, m, K, codes, a, blocksize_log2, N, b, GemvLora{}, silu_mul, r, s, yt, num_sms,
                            stream);
  };
  if (dtype == DType::kBFloat16)
    run(__nv_bfloat16{});
  else
    run(__half{});
}

}  // namespace lorax::nf4::cuda

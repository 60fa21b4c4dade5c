// NF4 CUDA kernels: quantize, dequantize, a GEMV for a few rows of activations and the fused dequant +
// tensor-core GEMM for more of them. Numerics match the CPU kernels bit for bit (dequantize) by using explicit
// _rn intrinsics where bitsandbytes rounds twice; the GEMV and the GEMM accumulate in fp32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

#include "common/convert.cuh"
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

// The code book and, for double quantization, the 8-bit absmax code book, staged in shared memory.
struct Tables {
  float nf4[kNumCodes];
  float code2[256];
};

__device__ __forceinline__ void load_tables(Tables& t, const AbsmaxArgs& a) {
  constexpr float kValues[kNumCodes] = LORAX_NF4_VALUES;
  for (int i = threadIdx.x; i < kNumCodes; i += blockDim.x) t.nf4[i] = kValues[i];
  if (a.code2 != nullptr)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) t.code2[i] = a.code2[i];
  __syncthreads();
}

// The absmax of block b as loaded (prefetchable), and its decoding once the load has landed.
struct RawAbsmax {
  uint32_t bits;  // fp32 bits, or the 8-bit code when double-quantized
  float scale2;   // nested absmax of its group (double quantization)
};

__device__ __forceinline__ RawAbsmax load_absmax(const AbsmaxArgs& a, int64_t b) {
  if (a.code2 == nullptr) return {__float_as_uint(__ldg(static_cast<const float*>(a.absmax) + b)), 0.0f};
  return {__ldg(static_cast<const uint8_t*>(a.absmax) + b), __ldg(a.absmax2 + (b >> a.blocksize2_log2))};
}

__device__ __forceinline__ float decode_absmax(const AbsmaxArgs& a, const Tables& t, RawAbsmax r) {
  if (a.code2 == nullptr) return __uint_as_float(r.bits);
  return __fadd_rn(__fmul_rn(t.code2[r.bits], r.scale2), a.offset);  // two roundings, as bitsandbytes
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

// ---- GEMV for a few rows of x (decode) ------------------------------------------------------------------------
// A warp computes kGemvRows output features (a pair) for all MT (<= kGemvMaxM) rows of x. Its lanes split k into
// chunks of 32 weights (16 bytes of codes per weight row, inside one absmax block since blocks hold at least 32):
// lane l takes chunks l, l + 32, ..., and issues the code and absmax loads of kGemvUnroll chunks before it uses them. A
// chunk's products are summed with the code book's unscaled values and the sum is scaled once, so a weight costs
// one shared-memory lookup plus one FMA per row of x; gemm_kernel spends a lookup, a multiply, a rounding to T and
// a share of an mma on it. The lanes' sums meet in shuffles, and the kernel writes y (+ bias) itself: no workspace,
// no second kernel. Where the rows are too few to keep the GPU busy (o and down projections: 4096 outputs), KSPLIT
// (2 or 4) warps of a CTA split the pair's k and meet in shared memory, so a warp has one step of loads instead of
// several at a quarter of the occupancy (launch_gemv picks KSPLIT). Unlike gemm_kernel, the weights are not rounded
// to T before they multiply x, so the result is nearer the exact product than dequantize + matmul.
// Before its PDL prologue (launch.cuh) each warp asks L2 for its rows' codes: they stream in while the kernel
// before it finishes.
// The epilogue can do what would otherwise be two or three more kernels of a decode step (gemv() in nf4_cuda.h):
// - the LoRA expand (kLora, one row of x): the warp's lanes split its two rows' rank; the page lookups and loads of
//   B start in the first step, while the codes are in flight, and the delta joins the sum before its one rounding;
// - SwiGLU (silu_mul): the warp's two rows are gate row i and up row N/2 + i, and it writes T(T(silu(g)) * u).
constexpr int kGemvRows = 2;
constexpr int kGemvWarps = 4;
constexpr int kGemvUnroll = 4;
static_assert(kGemvRows == 2, "silu_mul pairs a warp's two rows (gate, up); the LoRA lanes split by row parity");

// The two activations in a 32-bit word as floats (the lower k in the low half).
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t w);
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t w) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xFFFF0000u));
}
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t w) {
  return __half22float2(*reinterpret_cast<const __half2*>(&w));
}

// The pool slot of the segment holding row 0, or -1 (none, or a slot outside the pool): as the LoRA kernels
// clamp segments, row 0 is in segment k when starts[k] <= 0 < starts[k + 1].
__device__ __forceinline__ int row0_adapter(const GemvLora& l) {
  for (int64_t k = 0; k < l.segments; ++k) {
    if (l.seg_starts[k] <= 0 && l.seg_starts[k + 1] > 0) {
      const int a = l.seg_slots[k];
      return a >= 0 && a < l.pool.slots ? a : -1;
    }
  }
  return -1;
}

// Lane l's share of the LoRA delta of output row rows[l % 2] (rank rows l / 2, l / 2 + 16, ...), scaled; the sum over
// the lanes of one parity is the row's delta.
template <typename T>
__device__ __forceinline__ float lora_part(const GemvLora& l, const int64_t (&rows)[kGemvRows], int lane) {
  const int adapter = row0_adapter(l);
  if (adapter < 0) return 0.0f;
  const int64_t n = lane % 2 == 0 ? rows[0] : rows[1];
  int i = 0;  // the module whose columns hold n
  while (i + 1 < l.mods.count && n >= l.mods.column[i + 1]) ++i;
  lora::cuda::Pool p = l.pool;
  p.module = l.mods.index[i];
  const int rank = p.ranks[lora::cuda::layer_module(p, adapter)];
  const int64_t o = n - l.mods.column[i];
  const T* arena = static_cast<const T*>(p.arena);
  const int64_t chunk = o >> p.page_log2, in_page = o & ((int64_t{1} << p.page_log2) - 1);
  const float* v = l.v + i * l.max_rank;
  float part = 0.0f;
  for (int j = lane / 2; j < rank; j += 16) {
    const int64_t page = lora::cuda::row_pages(p, adapter, 1, j)[chunk];
    part = fmaf(v[j], to_float(arena[(page << p.page_log2) + in_page]), part);
  }
  return part * l.scales[adapter];
}

template <typename T, int MT, bool kLora, int KSPLIT>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_kernel(const T* __restrict__ x, int K,
                                                               const uint8_t* __restrict__ codes, AbsmaxArgs a,
                                                               int bs_log2, int N, const T* __restrict__ bias,
                                                               GemvLora lora, bool silu_mul, T* __restrict__ y) {
  static_assert(!kLora || MT == 1, "the LoRA epilogue serves one row of x");
  static_assert(kGemvWarps % KSPLIT == 0, "a CTA's warps split k in KSPLIT parts");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, part = warp % KSPLIT, chunks = K / 32;
  // Warps warp - part .. warp - part + KSPLIT - 1 share the pair warp_id; this one sums the chunks of k that are
  // part (mod KSPLIT) in units of 32 chunks.
  const int64_t warp_id = int64_t{blockIdx.x} * (kGemvWarps / KSPLIT) + warp / KSPLIT;
  // The pair's weight rows: 2w and 2w + 1, or with silu_mul gate row w and up row N/2 + w. Past the last row the
  // warps read the last one again and write nothing.
  const int64_t half = N / 2, outputs = silu_mul ? half : N;
  const bool live = (silu_mul ? warp_id : warp_id * kGemvRows) < outputs;
  int64_t rows[kGemvRows];
  if (silu_mul) {
    rows[0] = min(warp_id, half - 1);
    rows[1] = rows[0] + half;
  } else {
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r) rows[r] = min(warp_id * kGemvRows + r, int64_t{N} - 1);
  }
  const int first = part * 32 + lane;  // this lane's first chunk; then every 32 * KSPLIT
  if (live)
    for (int c = first; c < chunks; c += 32 * KSPLIT)
#pragma unroll
      for (int r = 0; r < kGemvRows; ++r) prefetch_l2(codes + (rows[r] * K + 32 * int64_t{c}) / 2);
  pdl_prologue();
  __shared__ Tables t;
  load_tables(t, a);
  if (KSPLIT == 1 && !live) return;  // the whole warp (with KSPLIT > 1 it still meets the others at the barrier)

  float acc[kGemvRows][MT] = {};
  // This lane's share of the LoRA delta (kLora, part 0's warp): in the first step, or here for a lane with none.
  float delta = 0.0f;
  if constexpr (kLora) {
    if (live && part == 0 && first >= chunks) delta = lora_part<T>(lora, rows, lane);
  }
  for (int c0 = first; live && c0 < chunks; c0 += 32 * KSPLIT * kGemvUnroll) {
    uint4 q[kGemvUnroll][kGemvRows];
    RawAbsmax s[kGemvUnroll][kGemvRows];
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u)
#pragma unroll
      for (int r = 0; r < kGemvRows; ++r)
        if (c0 + 32 * KSPLIT * u < chunks) {
          const int64_t e = rows[r] * K + 32 * int64_t{c0 + 32 * KSPLIT * u};  // the chunk's first weight
          q[u][r] = __ldcs(reinterpret_cast<const uint4*>(codes + e / 2));
          s[u][r] = load_absmax(a, e >> bs_log2);
        }
    if constexpr (kLora) {
      if (part == 0 && c0 == first) delta = lora_part<T>(lora, rows, lane);  // its loads overlap the codes'
    }
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u) {
      if (c0 + 32 * KSPLIT * u >= chunks) continue;
      const int64_t k0 = 32 * int64_t{c0 + 32 * KSPLIT * u};
      float sum[kGemvRows][MT] = {};
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // weights 8i .. 8i + 7 of the chunk: code bytes 4i .. 4i + 3
        uint4 xv[MT];
#pragma unroll
        for (int m = 0; m < MT; ++m) xv[m] = __ldg(reinterpret_cast<const uint4*>(x + int64_t{m} * K + k0) + i);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float2 xf[MT];
#pragma unroll
          for (int m = 0; m < MT; ++m) xf[m] = unpack2<T>(word_of(xv[m], j));
#pragma unroll
          for (int r = 0; r < kGemvRows; ++r) {
            const uint32_t byte = byte_of(q[u][r], 4 * i + j);  // weight 8i + 2j in the high nibble, 8i + 2j + 1 low
            const float w0 = t.nf4[byte >> 4], w1 = t.nf4[byte & 0xF];
#pragma unroll
            for (int m = 0; m < MT; ++m) sum[r][m] = fmaf(w1, xf[m].y, fmaf(w0, xf[m].x, sum[r][m]));
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kGemvRows; ++r) {
        const float scale = decode_absmax(a, t, s[u][r]);
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[r][m] = fmaf(scale, sum[r][m], acc[r][m]);
      }
    }
  }

  float out[kGemvRows][MT];
#pragma unroll
  for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) out[r][m] = warp_sum(acc[r][m]);
  if constexpr (KSPLIT > 1) {  // the pair's parts meet in shared memory; part 0's warp finishes
    __shared__ float partial[kGemvWarps][kGemvRows][MT];
    if (lane == 0)
#pragma unroll
      for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) partial[warp][r][m] = out[r][m];
    __syncthreads();
    if (part != 0 || !live) return;
#pragma unroll
    for (int p = 1; p < KSPLIT; ++p)
#pragma unroll
      for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) out[r][m] += partial[warp + p][r][m];
  }
  if (bias != nullptr)
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
      for (int m = 0; m < MT; ++m) out[r][m] += to_float(bias[rows[r]]);
  if constexpr (kLora) {
#pragma unroll
    for (int offset = 16; offset >= 2; offset /= 2) delta += __shfl_xor_sync(0xffffffffu, delta, offset);
    out[0][0] += __shfl_sync(0xffffffffu, delta, 0);  // lanes of even parity: row 0's delta
    out[1][0] += __shfl_sync(0xffffffffu, delta, 1);
  }
  if (silu_mul) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (lane == m) {
        y[m * half + warp_id] = silu_mul_rounded<T>(rounded<T>(out[0][m]), rounded<T>(out[1][m]));
      }
    }
    return;
  }
#pragma unroll
  for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (lane == r * MT + m && warp_id * kGemvRows + r < N) y[int64_t{m} * N + rows[r]] = from_float<T>(out[r][m]);
}

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

// Row pairs that keep the GPU's warps busy with one step each (an H100 holds 64 warps on each of its 132 SMs):
// fewer pairs than this split k between 2 or 4 warps of a CTA. At K = 4096 a warp's two rows are one step of loads;
// a down projection's 2048 pairs of K = 14336 were 4 steps per warp at a quarter of the occupancy, and 1.3x slower
// than the M = 8 GEMM (bench/RESULTS.md, 2026-11-24).
constexpr int64_t kGemvBusyPairs = 6144;

template <typename T, int MT, bool kLora, int KSPLIT>
void launch_gemv_split(const T* x, int K, const uint8_t* codes, const AbsmaxArgs& a, int bs_log2, int N,
                       const T* bias, const GemvLora& lora, bool silu_mul, T* y, int64_t pairs, cudaStream_t stream) {
  constexpr int kPairsPerCta = kGemvWarps / KSPLIT;
  launch(gemv_kernel<T, MT, kLora, KSPLIT>, static_cast<int>((pairs + kPairsPerCta - 1) / kPairsPerCta),
         kGemvWarps * 32, 0, stream, x, K, codes, a, bs_log2, N, bias, lora, silu_mul, y);
}

template <typename T, int MT, bool kLora>
void launch_gemv(const T* x, int K, const uint8_t* codes, const AbsmaxArgs& a, int bs_log2, int N, const T* bias,
                 const GemvLora& lora, bool silu_mul, T* y, cudaStream_t stream) {
  const int64_t pairs = silu_mul ? N / 2 : (N + kGemvRows - 1) / kGemvRows, chunks = K / 32;
  if (pairs * 2 < kGemvBusyPairs && chunks >= 32 * 4)  // each part has at least a chunk per lane
    return launch_gemv_split<T, MT, kLora, 4>(x, K, codes, a, bs_log2, N, bias, lora, silu_mul, y, pairs, stream);
  if (pairs < kGemvBusyPairs && chunks >= 32 * 2)
    return launch_gemv_split<T, MT, kLora, 2>(x, K, codes, a, bs_log2, N, bias, lora, silu_mul, y, pairs, stream);
  launch_gemv_split<T, MT, kLora, 1>(x, K, codes, a, bs_log2, N, bias, lora, silu_mul, y, pairs, stream);
}

template <typename T>
void dispatch_gemm(const void* x_, int64_t M, int64_t K, const uint8_t* codes, const AbsmaxArgs& a, int bs_log2,
                   int64_t N, const void* bias_, float* ws, int num_sms, void* y_, cudaStream_t stream) {
  const T *x = static_cast<const T*>(x_), *bias = static_cast<const T*>(bias_);
  T* y = static_cast<T*>(y_);
  auto gemm = [&](auto nt) {
    launch_gemm<T, decltype(nt)::value>(x, M, K, codes, a, bs_log2, N, bias, ws, num_sms, y, stream);
  };
  static_assert(kGemvMaxM == 1, "dispatch_gemm instantiates the GEMV for one row");
  if (M == 1) return launch_gemv<T, 1, false>(x, K, codes, a, bs_log2, N, bias, GemvLora{}, false, y, stream);
  if (M <= 8) gemm(std::integral_constant<int, 1>{});
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

bool gemm_supported(int64_t M, int64_t N, int64_t K, DType dtype) {
  if (dtype == DType::kFloat || M < 1 || N < 1 || N > (int64_t{1} << 30) || K > (int64_t{1} << 30)) return false;
  if (M <= kGemvMaxM) return K % 32 == 0;
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

void gemv(const void* x, DType dtype, int64_t K, const uint8_t* codes, const AbsmaxArgs& a, int blocksize_log2,
          int64_t N, const void* bias, const GemvLora* lora, bool silu_mul, void* y, cudaStream_t stream) {
  auto run = [&](auto t) {
    using T = decltype(t);
    const T *xt = static_cast<const T*>(x), *b = static_cast<const T*>(bias);
    T* yt = static_cast<T*>(y);
    if (lora != nullptr)
      launch_gemv<T, 1, true>(xt, K, codes, a, blocksize_log2, N, b, *lora, silu_mul, yt, stream);
    else
      launch_gemv<T, 1, false>(xt, K, codes, a, blocksize_log2, N, b, GemvLora{}, silu_mul, yt, stream);
  };
  if (dtype == DType::kBFloat16)
    run(__nv_bfloat16{});
  else
    run(__half{});
}

}  // namespace lorax::nf4::cuda

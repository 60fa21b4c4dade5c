// SGMV / BGMV CUDA kernels over the paged adapter pool (see lora.h for the layout and the token groups).
//
// A tile is up to Tile tokens of one group (one adapter); find_tile numbers the tiles of all groups, so a grid's x
// covers the tiles that can exist (tile_bound), and its y the blocks of rank rows or outputs of each module.
// Shrink, v[t, :] = x[t] @ A[a].T: one CTA per (tile of up to kShrinkTile tokens, block of rank rows).
// Each warp owns RPW rank rows; the CTA walks `in` in chunks, staging the tile's x chunk in shared memory while
// each lane loads its 16-byte pieces of the warp's rows, so a tile's tokens share every weight load and a group's
// adapter rows are read from memory once per tile (once per call for a decode group). Rows past the adapter's
// rank, and rows without an adapter, get zeros: v needs no memset. Calls of at most kNarrowMaxTokens tokens
// (decode) take shrink_narrow_kernel instead: a CTA per two rank rows whose warps split `in`, as walking `in` in
// steps is latency the few tokens cannot hide.
// Expand, y[t, :] += scale * v[t] @ B[a].T: one CTA per (tile of up to kExpandTile tokens, block of outputs); the
// tile's v (times the scale) sits in shared memory, each thread owns 16 bytes of outputs for every token of the
// tile (loaded before the weights) and walks the rank with 8 rows' loads in flight. BGMV first buckets its tokens
// by adapter in one kernel (group_by_adapter) when it has more than kPerTokenMaxTokens tokens; fewer (decode) are
// one group each, read straight from the adapter indices: no grouping kernel, a CTA per token and block of rows or
// outputs, and tokens that share an adapter read its rows from L2 after the first. CTAs without a tile, or past
// their adapter's rank, exit at once.
// One call serves the modules of a fused projection (q, k, v): their blocks are stacked along the grid's y, so
// three modules cost one launch, not three.
// The sgmv and bgmv ops (shrink then expand) of at most kPerTokenMaxTokens tokens take apply_kernel instead on sm_90:
// both in one kernel, a thread block cluster per tile and module sharing v through distributed shared memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <limits>

#include <cub/block/block_scan.cuh>

#include "common/cluster.cuh"
#include "common/convert.cuh"
#include "common/launch.cuh"
#include "common/warp.cuh"
#include "lora/lora_cuda.h"
#include "lora/lora_device.cuh"

namespace lorax::lora::cuda {
namespace {

constexpr int kShrinkWarps = 8;
constexpr int kShrinkTile = 16;  // tokens per shrink CTA
constexpr int kShrinkUnroll = 4;  // 16-byte weight loads per lane, row and step
constexpr int kNarrowRows = 2;    // rank rows per narrow-shrink CTA
constexpr int kNarrowTile = 4;    // tokens per narrow-shrink CTA
constexpr int kNarrowUnroll = 4;  // 16-byte weight loads per lane and row in flight
constexpr int kNarrowMaxTokens = 16;  // calls with at most this many tokens take the narrow shrink
constexpr int kExpandThreads = 128;
constexpr int kExpandTile = 8;  // tokens per expand CTA
constexpr int kGroupThreads = 1024;
constexpr int kExpandBatch = 8;  // rank rows whose weight loads are in flight together

// VEC elements loaded as one (16-byte when VEC fills it) access; the caller guarantees alignment.
template <typename T, int VEC>
struct alignas(VEC * sizeof(T)) Packed {
  T e[VEC];
};

// The token groups and adapter indices are read past L1 (__ldcg): a kernel may have read them before its PDL wait
// (TileAdapter), and L1 could still hold those lines.
__device__ __forceinline__ int token_at(const TokenGroups& g, int pos) { return g.order ? __ldcg(g.order + pos) : pos; }

// Grids stack the call's modules along y: blockIdx.y = module * (gridDim.y / count) + block. Points p at this CTA's
// module and returns (module's position in the call, block within the module).
__device__ __forceinline__ int2 cta_module(const Modules& m, Pool& p) {
  const int per = static_cast<int>(gridDim.y) / m.count, i = static_cast<int>(blockIdx.y) / per;
  p.module = m.index[i];
  return make_int2(i, static_cast<int>(blockIdx.y) - i * per);
}

// N consecutive elements (global or shared memory) as floats: one 16-byte load when N elements fill it (the caller
// guarantees alignment).
template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* src, float (&dst)[N]) {
  if constexpr (N * sizeof(T) == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = static_cast<float>(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

template <typename T, int N>
__device__ __forceinline__ void copy_vec(T* dst, const T* src) {
  if constexpr (N * sizeof(T) == 16) {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = src[i];
  }
}

// Group k's adapter slot, or -1 for none (as for any index outside the pool).
__device__ __forceinline__ int group_adapter(const TokenGroups& g, const Pool& p, int k) {
  const int a = __ldcg(g.adapters + k);
  return a >= 0 && a < p.slots ? a : -1;
}

// A CTA's tokens: positions [begin, begin + n) of the group order, all in group `group` (n = 0: no tile).
struct TileRef {
  int group, begin, n;
};

// The call's tiles are its groups' tokens cut into pieces of at most Tile, groups in order; find_tile(g) gives CTA
// blockIdx.x tile blockIdx.x. Warp 0 finds it: a prefix sum of the groups' tile counts, 32 groups at a time. So a
// grid needs tile_bound(tokens, groups, Tile) CTAs along x for any layout, not groups x ceil(tokens / Tile), most
// of which would find no tokens (a decode step's 64 one-token segments: 64 CTAs, not 64 x 4).
// find_tile(g, want, found) finds tile `want` (a cluster's CTAs share one), with `found` a shared-memory slot.
template <int Tile>
__device__ TileRef find_tile(const TokenGroups& g, int want, TileRef& found) {
  if (g.starts == nullptr)  // one group per token (BGMV's decode calls): tile = token = group
    return TileRef{want, want, want < g.tokens ? 1 : 0};
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x, count = static_cast<int>(g.count), tokens = static_cast<int>(g.tokens);
    if (lane == 0) found = TileRef{0, 0, 0};
    __syncwarp();
    // before: the tiles of groups [0, k0); covered: where they end. Groups past the last token are empty, so a CTA
    // without a tile stops there instead of walking every group (BGMV has one per pool slot).
    for (int k0 = 0, before = 0, covered = 0; k0 < count && before <= want && covered < tokens; k0 += 32) {
      const int k = k0 + lane, start = k < count ? min(max(__ldcg(g.starts + k), 0), tokens) : tokens;
      const int len = k < count ? min(max(__ldcg(g.starts + k + 1), start), tokens) - start : 0;
      const int tiles = (len + Tile - 1) / Tile;
      const int end = before + warp_prefix_sum(tiles, lane), i = want - (end - tiles);  // i: tile within group k
      if (i >= 0 && want < end) found = TileRef{k, start + i * Tile, min(len - i * Tile, Tile)};
      before = __shfl_sync(0xffffffffu, end, 31);
      covered = __shfl_sync(0xffffffffu, start + len, 31);
    }
  }
  __syncthreads();
  return found;
}

template <int Tile>
__device__ TileRef find_tile(const TokenGroups& g) {
  __shared__ TileRef found;
  return find_tile<Tile>(g, static_cast<int>(blockIdx.x), found);
}

// A CTA's tile and the adapter of its group (-1: none, or no tile).
//
// The decode kernels start their chain of dependent loads (tile, adapter, rank, page table, weights) before their
// PDL wait, while the kernel before them finishes. The pool (arena, page table, ranks) is safe to read there, as
// weights are (launch.cuh): no kernel writes it. The token groups and adapter indices are not: the kernel just
// before may still be writing them. So a kernel reads its TileAdapter before the wait as a guess, reads the pool
// for it, reads it again after the wait (find_tile's and group_adapter's loads skip L1, which may hold the guess's
// lines), and keeps what it read for the guess only if the two are equal. A wrong guess costs the reads again,
// never a wrong result. Each thread checks its own guess, so no barrier depends on it.
// tests/test_cuda_emulated.py makes every guess wrong with a late write of the indices (cuda_emu.h).
struct TileAdapter {
  TileRef tile;
  int adapter;

  __device__ bool operator==(const TileAdapter& o) const {
    return tile.group == o.tile.group && tile.begin == o.tile.begin && tile.n == o.tile.n && adapter == o.adapter;
  }
};

// `found`: a shared-memory slot, one for each call in a kernel (a call's barrier does not cover the next one's).
template <int Tile>
__device__ TileAdapter tile_adapter(const TokenGroups& g, const Pool& p, int want, TileRef& found) {
  const TileRef tile = find_tile<Tile>(g, want, found);
  return {tile, tile.n > 0 ? group_adapter(g, p, tile.group) : -1};
}

// Asks L2 for elements [first, last) of rows [rows.x, rows.y) of the adapter's A (ab = 0) or B^T (ab = 1), a line
// (or a page, if smaller) at a time, spread over the CTA's `threads` threads.
template <typename T>
__device__ void prefetch_rows(const Pool& p, int adapter, int ab, int2 rows, int first, int last, int threads) {
  if (last <= first || rows.y <= rows.x) return;
  const T* arena = static_cast<const T*>(p.arena);
  const int mask = (1 << p.page_log2) - 1, step = min(128 / static_cast<int>(sizeof(T)), 1 << p.page_log2);
  const int begin = first / step * step, lines = (last - begin + step - 1) / step;
  for (int e = threadIdx.x; e < (rows.y - rows.x) * lines; e += threads) {
    const int i = rows.x + e / lines, o = begin + (e % lines) * step;
    prefetch_l2(arena + (int64_t{row_pages(p, adapter, ab, i)[o >> p.page_log2]} << p.page_log2) + (o & mask));
  }
}

// The adapter's rank at (p.layer, p.module) and the pages of its A rows row0 .. row0 + kNarrowRows - 1 (for rows
// past the rank, row 0's: never read), as the narrow shrinks read them.
struct NarrowRows {
  int rank;
  const int32_t* pages[kNarrowRows];

  __device__ __forceinline__ void read(const Pool& p, int adapter, int row0) {
    rank = adapter_rank(p, adapter);
#pragma unroll
    for (int r = 0; r < kNarrowRows; ++r) pages[r] = row_pages(p, max(adapter, 0), 0, row0 + r < rank ? row0 + r : 0);
  }
};

template <typename T, int VEC, int RPW>
__global__ void __launch_bounds__(kShrinkWarps * 32)
    shrink_kernel(const T* __restrict__ x, int in, Pool p, Modules mods, TokenGroups g, float* __restrict__ v,
                  int max_rank) {
  pdl_prologue();
  constexpr int kChunk = 32 * VEC * kShrinkUnroll;  // elements of `in` per step: one 16-byte load per lane per unroll
  __shared__ __align__(16) T xs[kShrinkTile][kChunk];  // the tile's x[:, k0 : k0 + kChunk)
  __shared__ int tok[kShrinkTile];
  const TileRef tile = find_tile<kShrinkTile>(g);
  const int n = tile.n;
  if (n <= 0) return;
  const int adapter = group_adapter(g, p, tile.group);
  const int2 mb = cta_module(mods, p);
  const int width = mods.count * max_rank;  // v's row: the modules' max_rank blocks side by side
  v += mb.x * max_rank;
  const int rank = adapter_rank(p, adapter);
  if (threadIdx.x < n) tok[threadIdx.x] = token_at(g, tile.begin + threadIdx.x);
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = mb.y * kShrinkWarps * RPW + warp;  // this warp: row0 + r * kShrinkWarps
  float acc[RPW][kShrinkTile];
#pragma unroll
  for (int r = 0; r < RPW; ++r)
#pragma unroll
    for (int j = 0; j < kShrinkTile; ++j) acc[r][j] = 0.0f;

  if (mb.y * kShrinkWarps * RPW < rank) {  // CTA-uniform: some row of this block is live
    const T* arena = static_cast<const T*>(p.arena);
    const int mask = (1 << p.page_log2) - 1;
    const int32_t* pages[RPW];
    bool live[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      live[r] = row0 + r * kShrinkWarps < rank;
      pages[r] = row_pages(p, adapter, 0, live[r] ? row0 + r * kShrinkWarps : 0);
    }
    // Each step issues all its loads (the x chunk into shared memory, this warp's weights into registers) before
    // any arithmetic waits on them: a few memory round trips per call instead of one per token and step.
    for (int k0 = 0; k0 < in; k0 += kChunk) {
      constexpr int kVecs = kChunk / VEC;
      for (int e = threadIdx.x; e < n * kVecs; e += kShrinkWarps * 32) {
        const int j = e / kVecs, c = (e - j * kVecs) * VEC;
        if (k0 + c < in) copy_vec<T, VEC>(&xs[j][c], x + int64_t{tok[j]} * in + k0 + c);
      }
      float w[RPW][kShrinkUnroll][VEC];
#pragma unroll
      for (int r = 0; r < RPW; ++r)
#pragma unroll
        for (int u = 0; u < kShrinkUnroll; ++u) {
          const int k = k0 + (u * 32 + lane) * VEC;
          if (live[r] && k < in) {
            load_floats(arena + (int64_t{pages[r][k >> p.page_log2]} << p.page_log2) + (k & mask), w[r][u]);
          } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) w[r][u][e] = 0.0f;
          }
        }
      __syncthreads();
#pragma unroll
      for (int j = 0; j < kShrinkTile; ++j) {
        if (j < n) {
#pragma unroll
          for (int u = 0; u < kShrinkUnroll; ++u) {
            const int c = (u * 32 + lane) * VEC;
            if (k0 + c < in) {
              float xv[VEC];
              load_floats(&xs[j][c], xv);
#pragma unroll
              for (int r = 0; r < RPW; ++r)
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc[r][j] = fmaf(xv[e], w[r][u][e], acc[r][j]);
            }
          }
        }
      }
      __syncthreads();  // xs is refilled next step
    }
  }
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int row = row0 + r * kShrinkWarps;
    if (row >= max_rank) continue;  // warp-uniform
#pragma unroll
    for (int j = 0; j < kShrinkTile; ++j) {
      if (j < n) {
        const float s = warp_sum(acc[r][j]);
        if (lane == 0) v[int64_t{tok[j]} * width + row] = s;
      }
    }
  }
}

// Shrink for few tokens (decode): the latency of walking `in` step by step dominates, so one CTA owns
// kNarrowRows rank rows for up to kNarrowTile tokens and its warps split `in` between them (a 4096-wide row is one
// step of loads); the warps' partial sums meet in shared memory. Deterministic: no atomics. The first step's weights
// are loaded before the PDL wait, for the tile and adapter guessed there (TileAdapter).
template <typename T, int VEC>
__global__ void __launch_bounds__(kShrinkWarps * 32)
    shrink_narrow_kernel(const T* __restrict__ x, int in, Pool p, Modules mods, TokenGroups g,
                         float* __restrict__ v, int max_rank) {
  constexpr int kStep = kShrinkWarps * 32 * VEC * kNarrowUnroll;  // elements of `in` per step
  __shared__ float part[kShrinkWarps][kNarrowRows][kNarrowTile];
  __shared__ int tok[kNarrowTile];
  __shared__ TileRef found[2];  // before the wait, and after
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int2 mb = cta_module(mods, p);
  const int row0 = mb.y * kNarrowRows;
  const T* arena = static_cast<const T*>(p.arena);
  const int mask = (1 << p.page_log2) - 1;
  NarrowRows rows;
  Packed<T, VEC> w[kNarrowRows][kNarrowUnroll];  // the rows' weights at `in` positions [k0, k0 + kStep)
  auto load_step = [&](int k0) {
#pragma unroll
    for (int r = 0; r < kNarrowRows; ++r)
#pragma unroll
      for (int u = 0; u < kNarrowUnroll; ++u) {
        const int k = k0 + ((u * kShrinkWarps + warp) * 32 + lane) * VEC;
        if (row0 + r < rows.rank && k < in) {
          w[r][u] = *reinterpret_cast<const Packed<T, VEC>*>(arena + (int64_t{rows.pages[r][k >> p.page_log2]}
                                                                      << p.page_log2) + (k & mask));
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) w[r][u].e[e] = from_float<T>(0.0f);
        }
      }
  };
  const TileAdapter guess = tile_adapter<kNarrowTile>(g, p, static_cast<int>(blockIdx.x), found[0]);
  rows.read(p, guess.adapter, row0);
  load_step(0);
  pdl_prologue();
  const TileAdapter now = tile_adapter<kNarrowTile>(g, p, static_cast<int>(blockIdx.x), found[1]);
  const int n = now.tile.n;
  if (n <= 0) return;
  if (!(now == guess)) {
    rows.read(p, now.adapter, row0);
    load_step(0);
  }
  const int width = mods.count * max_rank;
  v += mb.x * max_rank;
  if (threadIdx.x < n) tok[threadIdx.x] = token_at(g, now.tile.begin + threadIdx.x);
  __syncthreads();

  float acc[kNarrowRows][kNarrowTile];
#pragma unroll
  for (int r = 0; r < kNarrowRows; ++r)
#pragma unroll
    for (int j = 0; j < kNarrowTile; ++j) acc[r][j] = 0.0f;
  if (row0 < rows.rank) {  // CTA-uniform
    for (int k0 = 0; k0 < in; k0 += kStep) {
      if (k0 > 0) load_step(k0);
#pragma unroll
      for (int j = 0; j < kNarrowTile; ++j) {
        if (j >= n) break;
#pragma unroll
        for (int u = 0; u < kNarrowUnroll; ++u) {
          const int k = k0 + ((u * kShrinkWarps + warp) * 32 + lane) * VEC;
          if (k < in) {
            float xv[VEC];
            load_floats<T, VEC>(x + int64_t{tok[j]} * in + k, xv);
#pragma unroll
            for (int r = 0; r < kNarrowRows; ++r)
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[r][j] = fmaf(xv[e], static_cast<float>(w[r][u].e[e]), acc[r][j]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kNarrowRows; ++r)
#pragma unroll
    for (int j = 0; j < kNarrowTile; ++j) {
      const float s = warp_sum(acc[r][j]);
      if (lane == 0) part[warp][r][j] = s;
    }
  __syncthreads();
  if (threadIdx.x < kNarrowRows * kNarrowTile) {
    const int r = threadIdx.x / kNarrowTile, j = threadIdx.x % kNarrowTile, row = row0 + r;
    if (j < n && row < max_rank) {
      float s = 0.0f;
#pragma unroll
      for (int q = 0; q < kShrinkWarps; ++q) s += part[q][r][j];
      v[int64_t{tok[j]} * width + row] = s;
    }
  }
}

// add_rms_norm of one row and the narrow shrink of its output in one kernel (a batch-1 decode step: the norm before
// the q/k/v and the gate/up projections). Grid and rank rows as shrink_narrow_kernel's for one token; every CTA
// with rank rows to do computes the norm itself (the row is a few KB, read from L2), as layers' add_rms_norm
// rounds it: s = T(x + residual), out = T(w * T(s * rsqrt(mean(s^2) + eps))), with one block sum in a fixed
// order, so every CTA gets the same out; CTA 0 writes out and s. The CTA's A rows stream into L2 from before the
// PDL wait, for the tile and adapter guessed there (TileAdapter).
template <typename T, int VEC>
__global__ void __launch_bounds__(kShrinkWarps * 32)
    norm_shrink_kernel(const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ weight,
                       int cols, float eps, T* __restrict__ out, T* __restrict__ sum, Pool p, Modules mods,
                       TokenGroups g, float* __restrict__ v, int max_rank) {
  extern __shared__ float normed[];  // [cols]: the norm's output, as out holds it
  __shared__ float part[kShrinkWarps][kNarrowRows];
  __shared__ TileRef found[2];  // before the wait, and after
  const int2 mb = cta_module(mods, p);
  const int row0 = mb.y * kNarrowRows;
  const T* arena = static_cast<const T*>(p.arena);
  const int mask = (1 << p.page_log2) - 1;
  NarrowRows rows;
  // Before the wait, for the guessed adapter (TileAdapter): its rows stream into L2 while the kernel before ends,
  const TileAdapter guess = tile_adapter<kNarrowTile>(g, p, static_cast<int>(blockIdx.x), found[0]);
  rows.read(p, guess.adapter, row0);
  prefetch_rows<T>(p, max(guess.adapter, 0), 0, make_int2(row0, min(rows.rank, row0 + kNarrowRows)), 0, cols,
                   kShrinkWarps * 32);
  // and the norm's weight, and the residual (written kernels before; a prefetch of a line being written is only
  // early: L2, where every write lands, stays coherent)
  constexpr int kLine = 128 / sizeof(T);  // elements of a 128-byte line
  for (int k = threadIdx.x * kLine; k < cols; k += kShrinkWarps * 32 * kLine) {
    prefetch_l2(weight + k);
    prefetch_l2(residual + k);
  }
  pdl_prologue();
  const TileAdapter now = tile_adapter<kNarrowTile>(g, p, static_cast<int>(blockIdx.x), found[1]);
  if (!(now == guess)) rows.read(p, now.adapter, row0);
  const int rank = rows.rank;
  v += mb.x * max_rank;
  const bool writer = blockIdx.y == 0, live = row0 < rank;
  if (!writer && !live) {  // v's rows past the rank are zeros
    if (threadIdx.x < kNarrowRows && row0 + static_cast<int>(threadIdx.x) < max_rank) v[row0 + threadIdx.x] = 0.0f;
    return;
  }
  constexpr int kStep = kShrinkWarps * 32 * VEC;

  float sq = 0.0f;
  for (int k = threadIdx.x * VEC; k < cols; k += kStep) {
    float xs[VEC], rs[VEC];
    load_floats<T, VEC>(x + k, xs);
    load_floats<T, VEC>(residual + k, rs);
    Packed<T, VEC> s_out;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float s = rounded<T>(__fadd_rn(xs[e], rs[e]));
      normed[k + e] = s;
      s_out.e[e] = from_float<T>(s);
      sq = fmaf(s, s, sq);
    }
    if (writer) *reinterpret_cast<Packed<T, VEC>*>(sum + k) = s_out;
  }
  const float inv = 1.0f / sqrtf(block_sum(sq) / static_cast<float>(cols) + eps);  // IEEE sqrt, division
  float acc[kNarrowRows] = {};
  for (int k = threadIdx.x * VEC; k < cols; k += kStep) {
    float ws[VEC];
    load_floats<T, VEC>(weight + k, ws);
    Packed<T, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float n = rounded<T>(__fmul_rn(ws[e], rounded<T>(__fmul_rn(normed[k + e], inv))));
      normed[k + e] = n;
      o.e[e] = from_float<T>(n);
    }
    if (writer) *reinterpret_cast<Packed<T, VEC>*>(out + k) = o;
    if (!live) continue;
#pragma unroll
    for (int r = 0; r < kNarrowRows; ++r) {
      if (row0 + r >= rank) continue;
      float a[VEC];
      load_floats<T, VEC>(arena + (int64_t{rows.pages[r][k >> p.page_log2]} << p.page_log2) + (k & mask), a);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[r] = fmaf(normed[k + e], a[e], acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < kNarrowRows; ++r) {
    const float total = warp_sum(acc[r]);
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32][r] = total;
  }
  __syncthreads();
  if (threadIdx.x < kNarrowRows && row0 + static_cast<int>(threadIdx.x) < max_rank) {
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kShrinkWarps; ++w) total += part[w][threadIdx.x];
    v[row0 + threadIdx.x] = row0 + static_cast<int>(threadIdx.x) < rank ? total : 0.0f;
  }
}

// y[tok[j], col : col + VEC] += sum over i < rank of sv[j * sv_stride + i] * B^T[i, col : col + VEC], for the tile's
// n tokens (sv: scale * v). y's values are loaded first, then the rank is walked with kExpandBatch rows' page
// lookups and loads in flight together; one rounding of each output.
template <typename T, int VEC, int Tile>
__device__ __forceinline__ void expand_columns(T* y, int64_t ld, const int* tok, int n, int64_t col, const Pool& p,
                                               int adapter, int rank, const float* sv, int sv_stride) {
  const T* arena = static_cast<const T*>(p.arena);
  const int32_t* pages = row_pages(p, adapter, 1, 0) + (col >> p.page_log2);  // row i's page: pages[i * chunks]
  const int64_t in_page = col & ((1 << p.page_log2) - 1);
  Packed<T, VEC> prior[Tile];
#pragma unroll
  for (int j = 0; j < Tile; ++j)
    if (j < n) prior[j] = *reinterpret_cast<const Packed<T, VEC>*>(y + tok[j] * ld + col);
  float acc[Tile][VEC] = {};
  for (int i0 = 0; i0 < rank; i0 += kExpandBatch) {
    Packed<T, VEC> w[kExpandBatch];
#pragma unroll
    for (int u = 0; u < kExpandBatch; ++u)
      if (i0 + u < rank)
        w[u] = *reinterpret_cast<const Packed<T, VEC>*>(arena + (int64_t{pages[(i0 + u) * p.chunks]} << p.page_log2) +
                                                        in_page);
#pragma unroll
    for (int u = 0; u < kExpandBatch; ++u) {
      if (i0 + u >= rank) break;
#pragma unroll
      for (int j = 0; j < Tile; ++j) {
        if (j < n) {
          const float s = sv[j * sv_stride + i0 + u];
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[j][e] = fmaf(s, static_cast<float>(w[u].e[e]), acc[j][e]);
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < Tile; ++j) {
    if (j < n) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) prior[j].e[e] = from_float<T>(static_cast<float>(prior[j].e[e]) + acc[j][e]);
      *reinterpret_cast<Packed<T, VEC>*>(y + tok[j] * ld + col) = prior[j];
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kExpandThreads)
    expand_kernel(T* __restrict__ y, int64_t ld, const float* __restrict__ v, int max_rank, Pool p, Modules mods,
                  const float* __restrict__ scales, TokenGroups g) {
  pdl_prologue();
  const TileRef tile = find_tile<kExpandTile>(g);
  const int n = tile.n;
  const int adapter = n > 0 ? group_adapter(g, p, tile.group) : -1;
  if (adapter < 0) return;
  const int2 mb = cta_module(mods, p);
  const int width = mods.count * max_rank, out = static_cast<int>(mods.column[mb.x + 1] - mods.column[mb.x]);
  v += mb.x * max_rank;
  y += mods.column[mb.x];
  const int rank = adapter_rank(p, adapter);
  if (rank == 0) return;
  extern __shared__ float scaled_v[];  // [kExpandTile][rank]: scale * v of the tile's tokens
  __shared__ int tok[kExpandTile];
  const float scale = scales[adapter];
  if (threadIdx.x < n) tok[threadIdx.x] = token_at(g, tile.begin + threadIdx.x);
  for (int e = threadIdx.x; e < n * rank; e += kExpandThreads) {
    const int j = e / rank, i = e - j * rank;
    scaled_v[e] = scale * v[int64_t{token_at(g, tile.begin + j)} * width + i];
  }
  __syncthreads();

  const int o = (mb.y * kExpandThreads + threadIdx.x) * VEC;
  if (o >= out) return;
  expand_columns<T, VEC, kExpandTile>(y, ld, tok, n, o, p, adapter, rank, scaled_v, rank);
}

// Shrink and expand in one kernel, for decode (few tokens) on sm_90: a cluster of C CTAs (cluster.cuh) per tile of
// up to kApplyTile tokens and module. CTA c of the cluster shrinks piece c of `in` into its partial v (shared
// memory), reads the other CTAs' partials after a cluster barrier and sums them in rank order (so every CTA gets the
// same v), then expands into piece c of the module's outputs. v never leaves the chip, and the step costs one
// kernel's latency chain instead of two: adapter, rank, page table, weights, once. The CTA's pieces of A and B
// stream into L2 from before the PDL wait, for the tile and adapter guessed there (TileAdapter). Tokens without an
// adapter, and modules the adapter does not touch, are skipped (the whole cluster returns: it shares the tile and
// module).
constexpr int kApplyThreads = 128;
constexpr int kApplyWarps = kApplyThreads / 32;
constexpr int kApplyTile = kNarrowTile;  // tokens per tile: a segment's tokens share each weight load
constexpr int kApplyRows = 4;            // rank rows per warp and pass of the shrink
constexpr int kApplyUnroll = 4;          // 16-byte weight loads per lane and row in flight
constexpr int kMaxCluster = 8;           // the portable cluster size

// Piece i of n items cut into `parts` pieces of ceil(n / parts): [begin, end).
__device__ __forceinline__ int2 piece(int n, int parts, int i) {
  const int per = (n + parts - 1) / parts;
  return make_int2(min(n, i * per), min(n, (i + 1) * per));
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kApplyThreads)
    apply_kernel(T* __restrict__ y, int64_t ld, const T* __restrict__ x, int in, Pool p, Modules mods,
                 const float* __restrict__ scales, TokenGroups g, int max_rank) {
  // Dynamic only (cluster.cuh): part [kApplyTile][max_rank], this CTA's partial v, which the cluster reads; total,
  // the same shape, scale * v; then the tile before the PDL wait and after, and its tokens.
  extern __shared__ float apply_shared[];
  float* part = apply_shared;
  float* total = part + kApplyTile * max_rank;
  TileRef* found = reinterpret_cast<TileRef*>(total + kApplyTile * max_rank);
  int* tok = reinterpret_cast<int*>(found + 2);
  const int c = cluster_rank(), C = cluster_size(), want = static_cast<int>(blockIdx.x) / C;
  const int2 mb = cta_module(mods, p);
  const int2 ks = piece(in / VEC, C, c);  // this CTA's vectors of `in`
  const int2 outs = piece(static_cast<int>(mods.column[mb.x + 1] - mods.column[mb.x]) / VEC, C, c);  // of outputs
  // Before the wait, for the guessed adapter (TileAdapter): this CTA's A and B pieces stream into L2 while the kernel
  // before ends.
  const TileAdapter guess = tile_adapter<kApplyTile>(g, p, want, found[0]);
  int rank = adapter_rank(p, guess.adapter);
  prefetch_rows<T>(p, max(guess.adapter, 0), 0, make_int2(0, rank), ks.x * VEC, ks.y * VEC, kApplyThreads);
  prefetch_rows<T>(p, max(guess.adapter, 0), 1, make_int2(0, rank), outs.x * VEC, outs.y * VEC, kApplyThreads);
  pdl_prologue();
  const TileAdapter now = tile_adapter<kApplyTile>(g, p, want, found[1]);
  const int n = now.tile.n, adapter = now.adapter;
  if (adapter < 0) return;
  if (!(now == guess)) rank = adapter_rank(p, adapter);
  if (rank == 0) return;
  if (threadIdx.x < n) tok[threadIdx.x] = token_at(g, now.tile.begin + threadIdx.x);
  const T* arena = static_cast<const T*>(p.arena);
  const int mask = (1 << p.page_log2) - 1;
  y += mods.column[mb.x];
  __syncthreads();  // tok

  // Shrink piece c of `in`: warp w takes rank rows [4w, 4w + 4), then [16 + 4w, ...), ...; its lanes split the
  // piece's vectors, kApplyUnroll loads per row in flight, and each token of the tile uses every load.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r0 = warp * kApplyRows; r0 < rank; r0 += kApplyWarps * kApplyRows) {  // warp-uniform
    const int32_t* pages[kApplyRows];
#pragma unroll
    for (int i = 0; i < kApplyRows; ++i) pages[i] = row_pages(p, adapter, 0, min(r0 + i, rank - 1));
    float acc[kApplyRows][kApplyTile] = {};
    for (int v0 = ks.x; v0 < ks.y; v0 += 32 * kApplyUnroll) {
      Packed<T, VEC> w[kApplyRows][kApplyUnroll];
#pragma unroll
      for (int i = 0; i < kApplyRows; ++i)
#pragma unroll
        for (int u = 0; u < kApplyUnroll; ++u) {
          const int k = (v0 + u * 32 + lane) * VEC;
          if (r0 + i < rank && k < ks.y * VEC) {
            w[i][u] = *reinterpret_cast<const Packed<T, VEC>*>(arena + (int64_t{pages[i][k >> p.page_log2]}
                                                                        << p.page_log2) + (k & mask));
          } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) w[i][u].e[e] = from_float<T>(0.0f);
          }
        }
#pragma unroll
      for (int j = 0; j < kApplyTile; ++j) {
        if (j >= n) break;
#pragma unroll
        for (int u = 0; u < kApplyUnroll; ++u) {
          const int k = (v0 + u * 32 + lane) * VEC;
          if (k < ks.y * VEC) {
            float xv[VEC];
            load_floats<T, VEC>(x + int64_t{tok[j]} * in + k, xv);
#pragma unroll
            for (int i = 0; i < kApplyRows; ++i)
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[i][j] = fmaf(xv[e], static_cast<float>(w[i][u].e[e]), acc[i][j]);
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kApplyRows; ++i)
#pragma unroll
      for (int j = 0; j < kApplyTile; ++j) {
        const float s = warp_sum(acc[i][j]);
        if (lane == 0 && j < n && r0 + i < rank) part[j * max_rank + r0 + i] = s;
      }
  }

  cluster_sync();  // every CTA's partial v is written (and visible across the cluster)
  const float scale = scales[adapter];
  for (int e = threadIdx.x; e < n * rank; e += kApplyThreads) {
    const int j = e / rank, i = e - j * rank;
    float s = 0.0f;
    for (int q = 0; q < C; ++q) s += cluster_load(&part[j * max_rank + i], q);
    total[j * max_rank + i] = scale * s;
  }
  cluster_arrive();  // done with the other CTAs' shared memory; cluster_wait() below, before returning
  __syncthreads();   // total

  // Expand into piece c of the outputs: a thread per 16 bytes of them (for every token of the tile), walking the
  // rank with kExpandBatch rows' loads in flight, as expand_kernel.
  for (int o = outs.x + static_cast<int>(threadIdx.x); o < outs.y; o += kApplyThreads)
    expand_columns<T, VEC, kApplyTile>(y, ld, tok, n, int64_t{o} * VEC, p, adapter, rank, total, max_rank);
  cluster_wait();  // the other CTAs have read this one's part
}

// Counting sort of tokens by adapter in one CTA: bucket k holds adapter k - 1 (bucket 0: none).
__global__ void __launch_bounds__(kGroupThreads)
    group_kernel(const int32_t* __restrict__ indices, int tokens, int slots, int32_t* __restrict__ starts,
                 int32_t* __restrict__ adapters, int32_t* __restrict__ order) {
  pdl_prologue();
  using Scan = cub::BlockScan<int, kGroupThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  extern __shared__ int buckets[];  // count [K], then cursor [K]
  const int K = slots + 1;
  int *count = buckets, *cursor = buckets + K;
  auto bucket = [&](int t) {
    const int a = indices[t];
    return a >= 0 && a < slots ? a + 1 : 0;
  };
  for (int k = threadIdx.x; k < K; k += kGroupThreads) {
    count[k] = 0;
    adapters[k] = k - 1;
  }
  __syncthreads();
  for (int t = threadIdx.x; t < tokens; t += kGroupThreads) atomicAdd(&count[bucket(t)], 1);
  __syncthreads();
  int carry = 0;
  for (int base = 0; base < K; base += kGroupThreads) {
    const int k = base + threadIdx.x;
    int prefix, total;
    Scan(scan_storage).ExclusiveSum(k < K ? count[k] : 0, prefix, total);
    if (k < K) starts[k] = cursor[k] = carry + prefix;
    carry += total;
    __syncthreads();  // scan_storage is reused
  }
  if (threadIdx.x == 0) starts[K] = carry;
  for (int t = threadIdx.x; t < tokens; t += kGroupThreads) order[atomicAdd(&cursor[bucket(t)], 1)] = t;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The most tiles of `tile` tokens that `groups` groups of `tokens` tokens in all can make (find_tile): every
// nonempty group's last tile may be partial, and there are at most min(groups, tokens) nonempty groups.
int64_t tile_bound(int64_t tokens, int64_t groups, int64_t tile) {
  return std::min(tokens, (tokens + (tile - 1) * std::min(groups, tokens)) / tile);
}

bool aligned16(const void* ptr, int64_t elements_stride, int64_t elem_size) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (elements_stride * elem_size) % 16 == 0;
}

// Whether 16-byte loads serve the shrink of x [tokens, in]: x and its rows, and the arena's pages, start on 16 bytes.
template <typename T>
bool shrink_vectorizes(const void* x, int64_t in, const Pool& p) {
  return aligned16(x, in, sizeof(T)) && aligned16(p.arena, int64_t{1} << p.page_log2, sizeof(T));
}

// Whether 16-byte loads and stores serve the expand into y (row stride ld): the arena's pages, and every module's
// columns, start on 16 bytes and hold whole vectors.
template <typename T>
bool expand_vectorizes(const void* y, int64_t ld, const Pool& p, const Modules& m) {
  constexpr int kVec = 16 / sizeof(T);
  bool vec = aligned16(p.arena, int64_t{1} << p.page_log2, sizeof(T));
  for (int i = 0; i < m.count; ++i)
    vec = vec && (m.column[i + 1] - m.column[i]) % kVec == 0 &&
          aligned16(static_cast<const T*>(y) + m.column[i], ld, sizeof(T));
  return vec;
}

template <typename T, int VEC, int RPW>
void launch_shrink(const void* x, int64_t tokens, int64_t in, const Pool& p, const Modules& m, const TokenGroups& g,
                   float* v, int64_t max_rank, cudaStream_t stream) {
  dim3 grid(tile_bound(tokens, g.count, kShrinkTile), m.count * ceil_div(max_rank, kShrinkWarps * RPW));
  launch(shrink_kernel<T, VEC, RPW>, grid, kShrinkWarps * 32, 0, stream, static_cast<const T*>(x), in, p, m, g, v,
         max_rank);
}

template <typename T>
void dispatch_shrink(const void* x, int64_t tokens, int64_t in, const Pool& p, const Modules& m, const TokenGroups& g,
                     float* v, int64_t max_rank, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = shrink_vectorizes<T>(x, in, p);
  // decode: warps split `in`, so a row is a step of loads, not several
  if (tokens <= kNarrowMaxTokens || g.starts == nullptr) {
    dim3 grid(tile_bound(tokens, g.count, kNarrowTile), m.count * ceil_div(max_rank, kNarrowRows));
    if (vec) {
      launch(shrink_narrow_kernel<T, kVec>, grid, kShrinkWarps * 32, 0, stream, static_cast<const T*>(x), in, p, m, g,
             v, max_rank);
    } else {
      launch(shrink_narrow_kernel<T, 1>, grid, kShrinkWarps * 32, 0, stream, static_cast<const T*>(x), in, p, m, g, v,
             max_rank);
    }
    return;
  }
  // Up to 64 tokens: one row per warp for more CTAs; more (prefill): two, so x is re-read half as often.
  const bool wide = tokens > 64;
  if (vec && wide) return launch_shrink<T, kVec, 2>(x, tokens, in, p, m, g, v, max_rank, stream);
  if (vec) return launch_shrink<T, kVec, 1>(x, tokens, in, p, m, g, v, max_rank, stream);
  return launch_shrink<T, 1, 1>(x, tokens, in, p, m, g, v, max_rank, stream);
}

template <typename T, int VEC>
void launch_expand(void* y, int64_t tokens, int64_t ld, const float* v, int64_t max_rank, const Pool& p,
                   const Modules& m, const float* scales, const TokenGroups& g, cudaStream_t stream) {
  int64_t widest = 0;
  for (int i = 0; i < m.count; ++i) widest = std::max(widest, m.column[i + 1] - m.column[i]);
  dim3 grid(tile_bound(tokens, g.count, kExpandTile), m.count * ceil_div(widest, kExpandThreads * VEC));
  const size_t smem = sizeof(float) * kExpandTile * max_rank;
  launch(expand_kernel<T, VEC>, grid, kExpandThreads, smem, stream, static_cast<T*>(y), ld, v, max_rank, p, m, scales,
         g);
}

template <typename T>
void dispatch_expand(void* y, int64_t tokens, int64_t ld, const float* v, int64_t max_rank, const Pool& p,
                     const Modules& m, const float* scales, const TokenGroups& g, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (expand_vectorizes<T>(y, ld, p, m))
    return launch_expand<T, kVec>(y, tokens, ld, v, max_rank, p, m, scales, g, stream);
  launch_expand<T, 1>(y, tokens, ld, v, max_rank, p, m, scales, g, stream);
}

// The one-kernel shrink + expand (apply_kernel), where it serves the call: see apply() in lora_cuda.h.
template <typename T>
bool dispatch_apply(void* y, int64_t tokens, int64_t ld, const void* x, int64_t in, const Pool& p, const Modules& m,
                    const float* scales, const TokenGroups& g, int64_t max_rank, int num_sms, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const size_t smem = sizeof(float) * 2 * kApplyTile * max_rank + 2 * sizeof(TileRef) + sizeof(int) * kApplyTile;
  if (smem > 48 * 1024 || in > std::numeric_limits<int>::max()) return false;
  const bool vec = shrink_vectorizes<T>(x, in, p) && expand_vectorizes<T>(y, ld, p, m);
  const int64_t vectors = vec ? in / kVec : in;
  // Clusters as large as keep the grid within two CTAs an SM and each CTA at least a vector per lane of `in`.
  const int64_t ctas = tile_bound(tokens, g.count, kApplyTile) * m.count;
  unsigned cluster = 1;
  while (2 * cluster <= kMaxCluster && ctas * 2 * cluster <= 2 * int64_t{num_sms} && vectors >= 64 * cluster)
    cluster *= 2;
  const dim3 grid(static_cast<unsigned>(ctas / m.count * cluster), m.count);
  auto run = [&](auto kernel) {
    launch_cluster(kernel, grid, kApplyThreads, smem, stream, cluster, static_cast<T*>(y), ld,
                   static_cast<const T*>(x), static_cast<int>(in), p, m, scales, g, static_cast<int>(max_rank));
  };
  if (vec)
    run(apply_kernel<T, kVec>);
  else
    run(apply_kernel<T, 1>);
  return true;
}

}  // namespace

void group_by_adapter(const int32_t* indices, int64_t tokens, int64_t slots, int32_t* starts, int32_t* adapters,
                      int32_t* order, cudaStream_t stream) {
  const size_t smem = sizeof(int) * 2 * (slots + 1);
  launch(group_kernel, 1, kGroupThreads, smem, stream, indices, tokens, slots, starts, adapters, order);
}

void norm_shrink(const void* x, const void* residual, const void* weight, int64_t cols, float eps, void* out,
                 void* sum, DType dtype, const Pool& p, const Modules& m, const TokenGroups& g, float* v,
                 int64_t max_rank, cudaStream_t stream) {
  if (max_rank == 0 || m.count == 0) return;
  with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = cols % kVec == 0 && aligned16(x, cols, sizeof(T)) && aligned16(residual, cols, sizeof(T)) &&
                     aligned16(weight, cols, sizeof(T)) && aligned16(out, cols, sizeof(T)) &&
                     aligned16(sum, cols, sizeof(T)) && aligned16(p.arena, int64_t{1} << p.page_log2, sizeof(T));
    const dim3 grid(1, m.count * ceil_div(max_rank, kNarrowRows));
    const size_t smem = sizeof(float) * cols;
    auto run = [&](auto kernel) {
      launch(kernel, grid, kShrinkWarps * 32, smem, stream, static_cast<const T*>(x), static_cast<const T*>(residual),
             static_cast<const T*>(weight), static_cast<int>(cols), eps, static_cast<T*>(out), static_cast<T*>(sum),
             p, m, g, v, static_cast<int>(max_rank));
    };
    if (vec)
      run(norm_shrink_kernel<T, kVec>);
    else
      run(norm_shrink_kernel<T, 1>);
  });
}

void shrink(const void* x, DType dtype, int64_t tokens, int64_t in, const Pool& p, const Modules& m,
            const TokenGroups& g, float* v, int64_t max_rank, cudaStream_t stream) {
  if (tokens == 0 || g.count == 0 || max_rank == 0 || m.count == 0) return;
  with_dtype(dtype, [&](auto t) { dispatch_shrink<decltype(t)>(x, tokens, in, p, m, g, v, max_rank, stream); });
}

bool apply(void* y, DType dtype, int64_t tokens, int64_t ld, const void* x, int64_t in, const Pool& p,
           const Modules& m, const float* scales, const TokenGroups& g, int64_t max_rank, int num_sms,
           cudaStream_t stream) {
  if (!cluster_launch_supported() || tokens > kPerTokenMaxTokens) return false;
  if (tokens == 0 || g.count == 0 || max_rank == 0 || m.count == 0) return true;
  bool done = false;
  with_dtype(dtype, [&](auto t) {
    done = dispatch_apply<decltype(t)>(y, tokens, ld, x, in, p, m, scales, g, max_rank, num_sms, stream);
  });
  return done;
}

void expand(void* y, DType dtype, int64_t tokens, int64_t ld, const float* v, int64_t max_rank, const Pool& p,
            const Modules& m, const float* scales, const TokenGroups& g, cudaStream_t stream) {
  if (tokens == 0 || g.count == 0 || max_rank == 0 || m.count == 0) return;
  with_dtype(dtype, [&](auto t) { dispatch_expand<decltype(t)>(y, tokens, ld, v, max_rank, p, m, scales, g, stream); });
}

}  // namespace lorax::lora::cuda

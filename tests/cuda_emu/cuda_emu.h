// A CPU emulator for our CUDA kernels, for tests on machines without a GPU (tests/cuda_emu/build.py).
//
// tests/cuda_emu/build.py compiles the .cu files as C++ with this header first, after rewriting each
// `extern __shared__ T name[];` into a pointer to the launch's dynamic shared memory; their `lorax::launch` calls
// (launch.cuh, the stand-in for csrc/common/launch.cuh) come to emu::launch below.
//
// Execution model: the blocks of a launch run one after another (a cluster's blocks together). The threads of
// a block are fibers on the calling thread: each runs until it waits at a barrier (__syncthreads, __syncwarp, a
// warp shuffle) or returns, then the next one runs, in thread order for even blocks and reverse order for odd
// ones. So a read of another thread's write with no barrier between them sees the old value in one of the two
// orders: a missing __syncthreads shows up as a wrong result. A thread that returns leaves the barriers (as on
// Volta and later). Static __shared__ variables become function statics (one copy, owned by the one running
// block). Dynamic shared memory is a heap buffer of exactly the launch's size, filled with 0xff bytes (NaN as
// floats) before each block, so AddressSanitizer catches overruns and a read of shared memory nobody wrote shows
// in results.
//
// Thread block clusters (launch_cluster, csrc/common/cluster.cuh): the blocks of a cluster run together, their
// threads all fibers of one round robin, so the cluster barrier and reads of another block's shared memory
// (cluster_load) behave as on a GPU. Static __shared__ variables would be one copy for the whole cluster: kernels
// launched in clusters keep their shared memory dynamic (one buffer per block).
//
// It fails loudly on what a GPU would refuse or leave undefined and the CPU would not notice: blocks over 1024
// threads, grid y / z over 65535, dynamic shared memory over 48 KiB, a full-mask shuffle after lanes of the
// warp returned, a barrier that can never complete (deadlock), a thread of a kernel launched with lorax::launch
// that returns without having called pdl_prologue(); clusters over 8 blocks or not dividing the grid's x, a read
// of another block's shared memory before a cluster barrier (the block may not have started) or after that block
// returned, a thread that returns between its cluster arrive and wait.
//
// cp.async (csrc/common/cp_async.cuh, copies from global to shared memory) lands a group of copies only when the
// thread's cp_async_wait() must have it landed: a read of a stage before its wait and barrier sees the old bytes.
// A misaligned copy, or one to outside the dynamic shared memory, fails.
//
// Programmatic dependent launch: late_write() (below; the op torch.ops.lorax_emu.late_write) stands for a write of
// the kernel before that lands only when the next kernel's pdl_prologue() waits for it, so a test can check that
// what a kernel reads before its wait it reads again after.
//
// Tensor-core mma (csrc/common/mma.cuh) is a warp exchange like a shuffle: tests/cuda_emu/mma.cuh stands in for
// that header, and each lane computes its results from the warp's fragments.
//
// It does not model: warps running in lockstep (code that relies on it without __syncwarp is not caught), the
// memory model beyond the barriers, FMA contraction (the kernels are compiled with -ffp-contract=off, so a*b+c
// may differ from nvcc's code by an ulp), a tensor core's summation order, timing.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>  // before the macros below: it names parameters gridDim, blockDim
#include <vector_functions.h>

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

class Barrier;

// A cp.async copy (cp_async.cuh) that has not landed yet.
struct AsyncCopy {
  void* to;
  const void* from;
  size_t bytes;
};

using JumpBuffer = void*[5];

// The switches are not instrumented: AddressSanitizer would unpoison the whole stack before each jump (a system
// call and a memset every time). __builtin_longjmp may not be called from the function that calls
// __builtin_setjmp.
#define EMU_SWITCH __attribute__((noinline, no_sanitize_address))
EMU_SWITCH inline void jump(JumpBuffer& to) { __builtin_longjmp(to, 1); }

// One CUDA thread: a fiber (its own stack) that runs the kernel until it waits at a barrier. A fiber is entered
// through makecontext once per launch; every later switch is GCC's __builtin_setjmp / __builtin_longjmp, which
// save and restore only the registers: no system call for the signal mask (swapcontext), no interceptor that
// clears AddressSanitizer's shadow of the stack (longjmp).
struct Fiber {
  ucontext_t entry;
  JumpBuffer resume;
  void* stack = nullptr;
  uint3 index{};
  bool started = false, done = false;
  bool passed_prologue = false;  // called pdl_prologue() in this block
  const Barrier* waiting_on = nullptr;
  uint64_t waiting_phase = 0;
  struct Block* block = nullptr;  // the block it runs in this time
  bool cluster_arrived = false;   // between cluster_arrive() and cluster_wait()
  uint64_t cluster_phase = 0;     // the cluster barrier's phase at its arrival
  std::vector<AsyncCopy> copies_open;                // cp.async copies since the last commit
  std::vector<std::vector<AsyncCopy>> copy_groups;   // committed groups, oldest first
};

constexpr size_t kStackSize = size_t{1} << 16;  // a kernel's frames, with AddressSanitizer's redzones

inline JumpBuffer scheduler;
inline ucontext_t scheduler_context;  // written by the makecontext entry, never resumed
inline Fiber* current = nullptr;
inline std::function<void()>* current_body = nullptr;

// Back to the scheduler; returns when the scheduler runs this fiber again.
EMU_SWITCH inline void yield() {
  if (__builtin_setjmp(current->resume) == 0) {
    jump(scheduler);
  }
}

// A barrier for a group of threads that may shrink: a thread that returns from the kernel leaves it.
class Barrier {
 public:
  void reset(int expected) {
    expected_ = expected;
    arrived_ = 0;
  }
  int expected() const { return expected_; }
  uint64_t phase() const { return phase_; }

  void wait() { wait_for(arrive()); }

  // The two halves of wait(), for split barriers (barrier.cluster.arrive / wait): arrive returns the phase that
  // wait_for(phase) waits out.
  uint64_t arrive() {
    const uint64_t phase = phase_;
    if (++arrived_ == expected_) release();
    return phase;
  }
  void wait_for(uint64_t phase) {
    if (phase_ != phase) return;
    current->waiting_on = this;
    current->waiting_phase = phase;
    yield();  // the scheduler resumes this fiber once the phase has moved on
    current->waiting_on = nullptr;
  }

  void leave() {
    --expected_;
    if (arrived_ > 0 && arrived_ == expected_) release();
  }

 private:
  void release() {
    arrived_ = 0;
    ++phase_;
  }

  int expected_ = 0, arrived_ = 0;
  uint64_t phase_ = 0;
};

struct MmaFragments {
  uint32_t a[4], b[2];
};

struct Warp {
  Barrier barrier;
  alignas(16) unsigned char lanes[32][16];  // shuffle exchange: each lane's value
  MmaFragments mma[32];                     // mma exchange: each lane's A and B fragments
};

// A block of the cluster that is running (the blocks of one cluster run together; clusters one after another).
struct Block {
  Barrier barrier;
  std::vector<Warp> warps;
  std::vector<unsigned char> shared;  // dynamic shared memory
  uint3 index{};
  long live = 0;  // threads that have not returned
};

struct Cluster {
  Barrier barrier;            // barrier.cluster: every thread of its blocks
  std::vector<Block> blocks;  // by rank in the cluster
  bool started = false;       // a cluster barrier has completed: every block has started, as on a GPU
};

// A write of the kernel before that is still landing when this launch starts: programmatic dependent launch lets
// a kernel run up to its pdl_prologue() while the one before finishes. late_write(to, from, bytes) makes each
// cluster of the next launch see the bytes at `to` as they are until a thread of it passes pdl_prologue(), and
// those of `from` after (and for good once the launch is over). So every block's reads before its wait are stale:
// a kernel that uses one without reading it again after the wait gives wrong results.
struct LateWrite {
  void* to;
  std::vector<unsigned char> before, after;
};
inline std::vector<LateWrite> late_writes;         // for the next launch
inline std::vector<LateWrite>* landing = nullptr;  // this launch's
inline bool landed = false;                        // in the running cluster

inline void late_write(void* to, const void* from, size_t bytes) {
  const auto* old = static_cast<const unsigned char*>(to);
  const auto* fresh = static_cast<const unsigned char*>(from);
  late_writes.push_back({to, std::vector<unsigned char>(old, old + bytes),
                         std::vector<unsigned char>(fresh, fresh + bytes)});
}

inline void land_late_writes(bool after) {
  if (landing == nullptr) return;
  for (const LateWrite& w : *landing) std::memcpy(w.to, (after ? w.after : w.before).data(), w.after.size());
  landed = after;
}

inline dim3 grid_dim, block_dim;
inline uint3 thread_idx, block_idx;
inline Block* block = nullptr;  // the running thread's block
inline Cluster* cluster = nullptr;

inline int linear_thread() { return thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z); }
inline Warp& my_warp() { return block->warps[linear_thread() / 32]; }

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(block->shared.data());
}

// cp.async (cp_async.cuh): copies wait in the thread's open group until cp_async_commit(), groups until
// cp_async_wait(n) leaves at most n of them in flight, or the thread returns; then they land in order.
inline void cp_async(void* to, const void* from, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(to) % bytes != 0 || reinterpret_cast<uintptr_t>(from) % bytes != 0)
    fail("a cp.async whose addresses are not aligned to its size: the GPU faults");
  const unsigned char *begin = block->shared.data(), *end = begin + block->shared.size();
  if (static_cast<unsigned char*>(to) < begin || static_cast<unsigned char*>(to) + bytes > end)
    fail("a cp.async to outside the block's dynamic shared memory");
  current->copies_open.push_back({to, from, bytes});
}

inline void cp_async_commit() {
  current->copy_groups.push_back(std::move(current->copies_open));
  current->copies_open.clear();
}

inline void land(const std::vector<AsyncCopy>& group) {
  for (const AsyncCopy& c : group) std::memcpy(c.to, c.from, c.bytes);
}

inline void cp_async_wait(size_t in_flight) {
  auto& groups = current->copy_groups;
  while (groups.size() > in_flight) {
    land(groups.front());
    groups.erase(groups.begin());
  }
}

// A fiber runs the kernel once per block: after each run it waits for the scheduler to start the next block.
inline void fiber_main() {
  for (;;) {
    (*current_body)();
    cp_async_commit();  // what is still in flight lands now (its sources are read: AddressSanitizer checks them)
    cp_async_wait(0);
    if (!current->passed_prologue)
      fail("a thread returned without calling pdl_prologue(): every kernel launched with lorax::launch must call it "
           "first (csrc/common/launch.cuh)");
    if (current->cluster_arrived) fail("a thread returned between cluster_arrive() and cluster_wait()");
    my_warp().barrier.leave();
    block->barrier.leave();
    cluster->barrier.leave();
    --block->live;
    current->done = true;
    yield();  // never resumed after the last block: the next launch enters the stack afresh
  }
}

// Fiber stacks, kept for the next launch (mmap: untouched pages cost nothing).
inline std::vector<void*>& stacks(size_t n) {
  static std::vector<void*> pool;
  while (pool.size() < n) {
    void* s = mmap(nullptr, kStackSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (s == MAP_FAILED) fail("mmap of a fiber stack failed");
    pool.push_back(s);
  }
  return pool;
}

// Runs fiber f until it waits or returns.
EMU_SWITCH inline void run(Fiber& f) {
  current = &f;
  thread_idx = f.index;
  block = f.block;
  block_idx = f.block->index;
  if (__builtin_setjmp(scheduler) == 0) {
    if (f.started) jump(f.resume);
    f.started = true;
    swapcontext(&scheduler_context, &f.entry);
  }
}

// Runs `body` (one thread's kernel call) for every thread of every block of the grid, in clusters of
// `cluster_size` blocks along x (1: every block alone, as a launch without clusters).
inline void launch(dim3 grid, dim3 threads, size_t shared_bytes, cudaStream_t /*stream*/, std::function<void()> body,
                   unsigned cluster_size = 1) {
  const long n = long{threads.x} * threads.y * threads.z;
  if (n < 1 || n > 1024) fail("a block of more than 1024 (or 0) threads: the launch fails on a GPU");
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535)
    fail("grid dimensions out of range (x >= 1, 1 <= y, z <= 65535)");
  if (shared_bytes > 48 * 1024) fail("more than 48 KiB of dynamic shared memory without opting in");
  if (cluster_size < 1 || cluster_size > 8 || grid.x % cluster_size != 0)
    fail("a cluster of more than 8 blocks (the portable limit), or one that does not divide the grid's x");
  grid_dim = grid;
  block_dim = threads;
  const long warps = (n + 31) / 32, total = n * cluster_size;
  Cluster state;
  state.blocks.resize(cluster_size);
  for (Block& b : state.blocks) {
    b.warps = std::vector<Warp>(warps);
    b.shared.resize(shared_bytes);
  }
  cluster = &state;
  current_body = &body;
  std::vector<LateWrite> late = std::move(late_writes);
  late_writes.clear();
  landing = &late;

  std::vector<Fiber> fibers(total);
  for (long t = 0; t < total; ++t) {
    Fiber& f = fibers[t];
    const long i = t % n;
    f.index = uint3{static_cast<unsigned>(i % threads.x), static_cast<unsigned>(i / threads.x % threads.y),
                    static_cast<unsigned>(i / threads.x / threads.y)};
    f.block = &state.blocks[t / n];
    f.stack = stacks(total)[t];
    getcontext(&f.entry);
    f.entry.uc_stack.ss_sp = f.stack;
    f.entry.uc_stack.ss_size = kStackSize;
    f.entry.uc_link = nullptr;
    makecontext(&f.entry, fiber_main, 0);
  }
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x0 = 0; x0 < grid.x; x0 += cluster_size) {
        for (unsigned r = 0; r < cluster_size; ++r) {
          Block& b = state.blocks[r];
          b.index = uint3{x0 + r, y, z};
          b.live = n;
          b.barrier.reset(static_cast<int>(n));
          for (long w = 0; w < warps; ++w)
            b.warps[w].barrier.reset(static_cast<int>(std::min<long>(32, n - 32 * w)));
          std::fill(b.shared.begin(), b.shared.end(), 0xff);
        }
        state.barrier.reset(static_cast<int>(total));
        state.started = false;
        land_late_writes(false);
        for (Fiber& f : fibers) {
          f.done = false;
          f.passed_prologue = false;
          f.waiting_on = nullptr;
          f.cluster_arrived = false;
        }
        // round robin: run each fiber that is not waiting until it waits or returns
        const bool reverse = (x0 / cluster_size + y + z) % 2 == 1;
        for (long remaining = total; remaining > 0;) {
          bool progressed = false;
          for (long i = 0; i < total; ++i) {
            Fiber& f = fibers[reverse ? total - 1 - i : i];
            if (f.done || (f.waiting_on != nullptr && f.waiting_on->phase() == f.waiting_phase)) continue;
            run(f);
            progressed = true;
            if (f.done) --remaining;
          }
          if (!progressed) fail("every thread of the block waits at a barrier that cannot complete: a deadlock");
        }
      }
  land_late_writes(true);
  landing = nullptr;
  block = nullptr;
  cluster = nullptr;
  current = nullptr;
}

inline void pdl_prologue() {
  current->passed_prologue = true;
  if (!landed) land_late_writes(true);
}
inline void syncthreads() { block->barrier.wait(); }
inline void syncwarp() { my_warp().barrier.wait(); }

// Thread block clusters (the stand-in for csrc/common/cluster.cuh is tests/cuda_emu/cluster.cuh).
inline int cluster_rank() { return static_cast<int>(block_idx.x % cluster->blocks.size()); }
inline int cluster_size() { return static_cast<int>(cluster->blocks.size()); }
inline void cluster_arrive() {
  if (current->cluster_arrived) fail("cluster_arrive() twice without cluster_wait() between");
  current->cluster_phase = cluster->barrier.arrive();
  current->cluster_arrived = true;
}
inline void cluster_wait() {
  if (!current->cluster_arrived) fail("cluster_wait() without cluster_arrive() before it");
  cluster->barrier.wait_for(current->cluster_phase);
  current->cluster_arrived = false;
  cluster->started = true;
}

// The address of `local` (in this block's dynamic shared memory) in block `rank` of the cluster.
template <typename T>
const T* cluster_address(const T* local, int rank) {
  const auto offset = reinterpret_cast<const unsigned char*>(local) - block->shared.data();
  if (offset < 0 || offset + sizeof(T) > block->shared.size())
    fail("cluster_load of an address outside the block's dynamic shared memory");
  if (rank < 0 || rank >= cluster_size()) fail("cluster_load from a rank outside the cluster");
  if (!cluster->started)
    fail("cluster_load before a cluster barrier: the other block may not have started (cluster_sync() first)");
  const Block& other = cluster->blocks[rank];
  if (other.live == 0) fail("cluster_load from a block that has returned (cluster_wait() before returning)");
  return reinterpret_cast<const T*>(other.shared.data() + offset);
}

// The warp of a lane that takes part in a warp-wide exchange (a shuffle, an mma): all 32 lanes must be live.
inline Warp& full_warp(const char* what) {
  Warp& w = my_warp();
  if (w.barrier.expected() != 32) fail(what);
  return w;
}

// A shuffle: each lane gets the value of lane `source(lane)` (its own where that is outside the warp).
template <typename T, typename Source>
T shuffle(const char* name, unsigned mask, T v, Source source) {
  static_assert(sizeof(T) <= 16, "shuffle of a type over 16 bytes");
  if (mask != 0xffffffffu) fail(name);  // partial masks are not emulated
  Warp& w = full_warp(name);            // a full mask in a warp of fewer than 32 live threads
  const int lane = linear_thread() % 32, from = source(lane);
  std::memcpy(w.lanes[lane], &v, sizeof(T));
  w.barrier.wait();
  T out;
  std::memcpy(&out, w.lanes[from >= 0 && from < 32 ? from : lane], sizeof(T));
  w.barrier.wait();
  return out;
}

// One lane's share of mma.sync.m16n8k16 (fragment layout in csrc/common/mma.cuh): c += A @ B, each result's
// 16 products summed in double and rounded once (a tensor core's internal order and rounding are not specified).
inline void mma_m16n8k16(bool half, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Warp& w = full_warp("mma.sync in a warp of fewer than 32 live threads (returned lanes, partial warp)");
  const int lane = linear_thread() % 32;
  w.mma[lane] = MmaFragments{{a[0], a[1], a[2], a[3]}, {b0, b1}};
  w.barrier.wait();
  auto value = [half](uint32_t word, int k) {  // a register holds the values at an even k (low half) and k + 1
    const uint16_t bits = static_cast<uint16_t>(k % 2 == 0 ? word & 0xFFFFu : word >> 16);
    if (!half) return std::bit_cast<float>(uint32_t{bits} << 16);
    return __half2float(std::bit_cast<__half>(bits));
  };
  auto A = [&](int row, int k) { return value(w.mma[4 * (row % 8) + k % 8 / 2].a[row / 8 + 2 * (k / 8)], k); };
  auto B = [&](int k, int col) { return value(w.mma[4 * col + k % 8 / 2].b[k / 8], k); };
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = lane / 4 + 8 * (i / 2), col = 2 * (lane % 4) + i % 2;
    double sum = c[i];
    for (int k = 0; k < 16; ++k) sum += static_cast<double>(A(row, k)) * B(k, col);
    out[i] = static_cast<float>(sum);
  }
  w.barrier.wait();  // every lane has read the fragments before any lane writes the next ones
  for (int i = 0; i < 4; ++i) c[i] = out[i];
}

}  // namespace emu

// The CUDA names the kernels use.
#undef __global__
#define __global__
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef threadIdx
#define threadIdx (::emu::thread_idx)
#undef blockIdx
#define blockIdx (::emu::block_idx)
#undef blockDim
#define blockDim (::emu::block_dim)
#undef gridDim
#define gridDim (::emu::grid_dim)

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::syncwarp(); }
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return emu::shuffle("__shfl_xor_sync: a partial mask, or a warp with returned lanes", mask, v,
                      [&](int lane) { return lane ^ (lane_mask & 31); });
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta) {
  return emu::shuffle("__shfl_up_sync: a partial mask, or a warp with returned lanes", mask, v,
                      [&](int lane) { return lane - static_cast<int>(delta); });
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane) {
  return emu::shuffle("__shfl_sync: a partial mask, or a warp with returned lanes", mask, v,
                      [&](int) { return src_lane & 31; });
}

// Rounded arithmetic: with -ffp-contract=off, plain float operations round each step as these do.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }
inline float __uint_as_float(unsigned v) { return std::bit_cast<float>(v); }
inline unsigned __float_as_uint(float v) { return std::bit_cast<unsigned>(v); }

template <typename T>
T __ldg(const T* p) {
  return *p;
}
template <typename T>
T __ldcs(const T* p) {
  return *p;
}
template <typename T>
T __ldcg(const T* p) {
  return *p;
}
// Blocks run one after another: every write of an earlier block is visible to a later one.
inline void __threadfence() {}

// One thread runs at a time, and only a barrier switches threads: a read-modify-write is atomic.
template <typename T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}

using std::max;
using std::min;

// As nvcc spells it (after every standard header of this one: libstdc++ writes __attribute__((__noinline__))).
#ifndef __noinline__
#define __noinline__ __attribute__((noinline))
#endif

// Asynchronous copies from global to shared memory (cp.async, sm_80+), for pipelines that keep several stages of
// loads in flight without holding them in registers. A thread's copies since its last cp_async_commit() form a
// group; cp_async_wait<n>() returns once at most n of the thread's groups are still in flight. Another thread may
// read the copied bytes after that wait and a barrier (__syncthreads) after it. tests/cuda_emu/cp_async.cuh stands
// in for this header in the CPU emulator, which lands each group's copies only when a wait says it must have.
#pragma once
#include <cstdint>

namespace lorax {

// 16 bytes, both addresses 16-byte aligned; cached in L2 only (streamed data).
__device__ __forceinline__ void cp_async_16(void* shared, const void* global) {
  const uint32_t to = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(to), "l"(global) : "memory");
}

// 4 bytes, both addresses 4-byte aligned.
__device__ __forceinline__ void cp_async_4(void* shared, const void* global) {
  const uint32_t to = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(to), "l"(global) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

}  // namespace lorax

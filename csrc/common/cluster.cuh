// Thread block clusters (compute capability 9.0+; launch_cluster in launch.cuh): the CTAs of a cluster are
// scheduled together, on one GPC, and read each other's shared memory. A cluster kernel keeps its shared memory
// dynamic (the CPU emulator gives each CTA of a cluster its own dynamic buffer, but one copy of static ones).
// Below sm_90 a CTA is a cluster of one, and the host launches cluster kernels there without clusters.
// tests/cuda_emu/cluster.cuh stands in for this header in the CPU emulator.
#pragma once
#include <cstdint>

namespace lorax {

// This CTA's rank in its cluster, and the cluster's CTA count (a launch without clusters: 0 and 1).
__device__ __forceinline__ int cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return static_cast<int>(r);
#else
  return 0;
#endif
}

__device__ __forceinline__ int cluster_size() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t n;
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(n));
  return static_cast<int>(n);
#else
  return 1;
#endif
}

// The cluster barrier in two halves, which every thread of the cluster calls in turn (all of a warp together):
// cluster_wait() returns once every thread of the cluster has called cluster_arrive(), and the writes each made
// to shared memory before it are visible. Between the two a thread can work that does not need the others.
// Another CTA's shared memory may be read only after a completed barrier (before it, that CTA may not have
// started) and until that CTA's last cluster_wait(): a CTA must not return while others may still read it.
__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
#endif
}

__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#else
  __syncthreads();
#endif
}

__device__ __forceinline__ void cluster_sync() {
  cluster_arrive();
  cluster_wait();
}

// *local as CTA `rank` of the cluster holds it: local points into this CTA's shared memory, and the other CTA's
// variable is at the same place in its own.
__device__ __forceinline__ float cluster_load(const float* local, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(local));
  uint32_t remote;
  float v;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(address), "r"(rank));
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
  return v;
#else
  (void)rank;
  return *local;
#endif
}

}  // namespace lorax

// Kernel launches with programmatic dependent launch (PDL, compute capability 9.0+): every kernel of ours is
// launched with launch() (or launch_cluster(), in thread block clusters) and calls pdl_prologue() before it uses
// anything that the kernels before it may write.
//
// A decode step is hundreds of short kernels in a row, and between two of them the GPU idles while the next one
// launches. With PDL the next kernel launches as soon as every CTA of the one before it has started: its CTAs
// wait in pdl_prologue() until that kernel has finished and its writes are visible, then run. So the launch
// overlaps the previous kernel's work, also inside a CUDA graph. Correctness needs only that a kernel uses nothing
// it read before its prologue but weights, which no kernel writes: L2 prefetches of them, the NF4 GEMV's loads of
// its absmax tables and first codes, and the adapter pool's arena, page table and ranks (written on the pool's copy
// stream, behind an event). The LoRA kernels also read their adapter indices there, as a guess that they check
// after the prologue (TileAdapter in lora_kernels.cu). Where PDL is off (older GPUs or CUDA, or
// set_programmatic_launch(false)) the prologue does nothing and launches are ordinary stream-ordered ones.
// tests/cuda_emu/launch.cuh stands in for this header in the CPU emulator, which checks that every thread of
// every kernel passes the prologue.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace lorax {

// First statement of every kernel: wait for the kernels before this one in the stream (griddepcontrol.wait:
// until they have completed and their writes are visible), then let the next kernel start launching
// (griddepcontrol.launch_dependents: its CTAs wait in their own prologue).
__device__ __forceinline__ void pdl_prologue() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Asks L2 for the 128-byte line at p, and goes on. Before pdl_prologue() this overlaps a kernel's first weight
// reads with the end of the kernel before it; it returns no data, and L2 is where every write lands, so it is safe
// there. Without PDL (below sm_90) there is nothing to overlap: it does nothing.
__device__ __forceinline__ void prefetch_l2(const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#endif
}

// Asks L2 for the bytes [p, p + bytes) in one bulk request (the copy engine's, sm_90), and goes on; as prefetch_l2,
// safe before pdl_prologue(). The range is cut to the 16-byte units that lie inside it, as the request needs.
__device__ __forceinline__ void prefetch_l2_bulk(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + 15) & ~uintptr_t{15};
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~uintptr_t{15};
  if (end > begin)
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(begin), "r"(static_cast<uint32_t>(end - begin))
                 : "memory");
#endif
}

// Whether launch() uses PDL on the current device: compute capability 9.0+, CUDA runtime and driver 12.4+ (stream
// capture of PDL launches), and not turned off with set_programmatic_launch(false). Defined in launch.cu.
bool programmatic_launch_enabled();

// Turns PDL on or off for later launches (CUDA graphs keep what they captured); returns the previous setting.
bool set_programmatic_launch(bool enabled);

// Whether launch_cluster() may use clusters of more than one CTA on the current device: compute capability 9.0+.
// Defined in launch.cu.
bool cluster_launch_supported();

// Lets `kernel` take `bytes` of dynamic shared memory on the current device: with its static shared memory, over
// 48 KB needs this opt-in (cudaFuncAttributeMaxDynamicSharedMemorySize), asked once per kernel and device for
// the most bytes so far.
// An error is left for the launch's check (the launch then fails). Defined in launch.cu.
void allow_dynamic_shared(const void* kernel, size_t bytes);

// kernel<<<grid, block, smem, stream>>>(args...) in clusters of `cluster` CTAs along x (cluster.cuh; 1: none, 2 to
// 8 where cluster_launch_supported(), and dividing grid.x), with PDL where programmatic_launch_enabled(). A launch
// error is left for the caller's C10_CUDA_KERNEL_LAUNCH_CHECK(), as with <<<>>>.
template <typename... Params, typename... Args>
void launch_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                    unsigned cluster, Args... args) {
  cudaLaunchAttribute attrs[2];
  unsigned count = 0;
  if (programmatic_launch_enabled()) {
    attrs[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[count++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster > 1) {
    attrs[count].id = cudaLaunchAttributeClusterDimension;
    attrs[count].val.clusterDim.x = cluster;
    attrs[count].val.clusterDim.y = 1;
    attrs[count++].val.clusterDim.z = 1;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attrs;
  config.numAttrs = count;
  (void)cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
}

// kernel<<<grid, block, smem, stream>>>(args...), with PDL where programmatic_launch_enabled().
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args... args) {
  launch_cluster(kernel, grid, block, smem, stream, 1u, args...);
}

}  // namespace lorax

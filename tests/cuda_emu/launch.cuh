// Emulator stand-in for csrc/common/launch.cuh (build.py puts it in its place): launch() runs the kernel on the
// emulator, and checks that every thread passes pdl_prologue() before it returns, as every kernel launched with
// programmatic dependent launch must (on a GPU, a kernel that skipped it could read its inputs before the
// kernel writing them had finished; here kernels run one after another, so only the missing call can show).
#pragma once
#include "cuda_emu.h"

namespace lorax {

inline void pdl_prologue() { ::emu::pdl_prologue(); }
// A hint with nothing to emulate, but its address must be one the kernel may read: AddressSanitizer checks it.
inline void prefetch_l2(const void* p) { (void)*static_cast<const volatile unsigned char*>(p); }
// Its whole range must be readable: AddressSanitizer checks the first and the last byte.
inline void prefetch_l2_bulk(const void* p, uint32_t bytes) {
  if (bytes == 0) return;
  (void)static_cast<const volatile unsigned char*>(p)[0];
  (void)static_cast<const volatile unsigned char*>(p)[bytes - 1];
}

// The emulator's launches take dynamic shared memory up to 48 KiB (cuda_emu.h): the opt-in beyond is the GPU's.
inline void allow_dynamic_shared(const void*, size_t) {}

// The emulator runs clusters (cuda_emu.h), as an H100 does.
inline bool cluster_launch_supported() { return true; }

template <typename... Params, typename... Args>
void launch_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                    unsigned cluster, Args... args) {
  ::emu::launch(grid, block, smem, stream, [&] { kernel(static_cast<Params>(args)...); }, cluster);
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args... args) {
  launch_cluster(kernel, grid, block, smem, stream, 1u, args...);
}

}  // namespace lorax

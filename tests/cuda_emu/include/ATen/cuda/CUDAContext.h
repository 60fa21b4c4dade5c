// Emulator stand-in (tests/cuda_emu): the current stream and device properties, without a GPU.
#pragma once
#include <cuda_runtime_api.h>

namespace at::cuda {

inline cudaStream_t getCurrentCUDAStream() { return nullptr; }

// An H100's SM count, so that work splits sized by SMs take the shapes they take there.
inline cudaDeviceProp* getCurrentDeviceProperties() {
  static cudaDeviceProp props = [] {
    cudaDeviceProp p{};
    p.multiProcessorCount = 132;
    return p;
  }();
  return &props;
}

}  // namespace at::cuda

// Emulator stand-in for csrc/common/mma.cuh (build.py puts it in its place): the warp's fragments meet in
// the warp's scratch, and each lane computes its four results from them (emu::mma_m16n8k16 in cuda_emu.h).
#pragma once
#include <cstdint>
#include <type_traits>

#include "cuda_emu.h"

namespace lorax {

template <typename T>
inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "T is __half or __nv_bfloat16");
  ::emu::mma_m16n8k16(std::is_same_v<T, __half>, c, a, b0, b1);
}

}  // namespace lorax

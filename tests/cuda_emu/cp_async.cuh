// Emulator stand-in for csrc/common/cp_async.cuh (build.py puts it in its place): a copy waits in its thread's
// open group, and lands (a memcpy that AddressSanitizer checks) only when cp_async_wait() must have it landed, or
// when the thread returns. So a read of a stage before its wait and barrier sees what was there before.
#pragma once
#include <cstdint>

#include "cuda_emu.h"

namespace lorax {

inline void cp_async_16(void* shared, const void* global) { ::emu::cp_async(shared, global, 16); }
inline void cp_async_4(void* shared, const void* global) { ::emu::cp_async(shared, global, 4); }
inline void cp_async_commit() { ::emu::cp_async_commit(); }

template <int N>
inline void cp_async_wait() {
  ::emu::cp_async_wait(N);
}

}  // namespace lorax

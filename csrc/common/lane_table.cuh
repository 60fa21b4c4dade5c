// A table of 256 32-bit entries in shared memory with a copy per lane (32 KB): lane l reads only bank l, so a
// warp's 32 lookups of any entries take one shared-memory cycle. A lookup by a byte of a word is a byte extract,
// a shift-add and a 32-bit shared load from the table's shared-window address (from a generic pointer, the
// compiler rebuilds that address and multiplies the index at every lookup). tests/cuda_emu/lane_table.cuh stands
// in for this header in the CPU emulator.
#pragma once
#include <cstdint>

namespace lorax {

struct LaneTable {
  uint32_t copies[256][32];  // [entry][lane]
};

using LaneColumn = uint32_t;  // the shared-window address of one lane's copy of entry 0

__device__ __forceinline__ LaneColumn lane_column(const LaneTable& t, int lane) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(&t.copies[0][lane]));
}

// The entry indexed by byte i (0..3) of word, from the lane's column.
__device__ __forceinline__ uint32_t lane_lookup(LaneColumn column, uint32_t word, int i) {
  const uint32_t address = column + (__byte_perm(word, 0u, 0x4440u | i) << 7);
  uint32_t v;
  asm("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(address));  // no side effects: the table is filled before
  return v;
}

}  // namespace lorax

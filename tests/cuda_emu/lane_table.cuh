// Emulator stand-in for csrc/common/lane_table.cuh (build.py puts it in its place): a lane's column is a pointer,
// and a lookup an indexed read that AddressSanitizer checks.
#pragma once
#include <cstdint>

#include "cuda_emu.h"

namespace lorax {

struct LaneTable {
  uint32_t copies[256][32];  // [entry][lane]
};

using LaneColumn = const uint32_t*;

inline LaneColumn lane_column(const LaneTable& t, int lane) { return &t.copies[0][lane]; }

inline uint32_t lane_lookup(LaneColumn column, uint32_t word, int i) { return column[32 * ((word >> (8 * i)) & 0xFF)]; }

}  // namespace lorax

// Emulator stand-in for csrc/common/cluster.cuh (build.py puts it in its place): the blocks of a cluster run
// together on the emulator (cuda_emu.h), which checks that another block's shared memory is read only between a
// cluster barrier and that block's last cluster_wait().
#pragma once
#include "cuda_emu.h"

namespace lorax {

inline int cluster_rank() { return ::emu::cluster_rank(); }
inline int cluster_size() { return ::emu::cluster_size(); }
inline void cluster_arrive() { ::emu::cluster_arrive(); }
inline void cluster_wait() { ::emu::cluster_wait(); }
inline void cluster_sync() {
  ::emu::cluster_arrive();
  ::emu::cluster_wait();
}
inline float cluster_load(const float* local, int rank) { return *::emu::cluster_address(local, rank); }

}  // namespace lorax

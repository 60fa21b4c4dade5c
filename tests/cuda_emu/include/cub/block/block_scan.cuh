// Emulator stand-in (tests/cuda_emu): cub::BlockScan's ExclusiveSum, through shared memory and two barriers.
// Like cub's, every thread of the block must call it, and the block must have BLOCK_THREADS threads.
#pragma once
#include "cuda_emu.h"

namespace cub {

template <typename T, int BLOCK_THREADS>
class BlockScan {
 public:
  struct TempStorage {
    T values[BLOCK_THREADS];
  };

  explicit BlockScan(TempStorage& storage) : storage_(storage) {
    if (emu::block_dim.x * emu::block_dim.y * emu::block_dim.z != BLOCK_THREADS)
      emu::fail("cub::BlockScan in a block whose size is not BLOCK_THREADS");
  }

  void ExclusiveSum(T input, T& output, T& aggregate) {
    const int me = emu::linear_thread();
    storage_.values[me] = input;
    __syncthreads();
    T before{}, total{};
    for (int i = 0; i < BLOCK_THREADS; ++i) {
      if (i < me) before += storage_.values[i];
      total += storage_.values[i];
    }
    __syncthreads();
    output = before;
    aggregate = total;
  }

 private:
  TempStorage& storage_;
};

}  // namespace cub

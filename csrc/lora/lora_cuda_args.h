// A checked PoolView as the CUDA kernels' arguments (lora_cuda.h): for the LoRA ops and for the NF4 GEMV, whose
// epilogue reads the pool too.
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "common/checks.h"
#include "lora/lora.h"
#include "lora/lora_cuda.h"

namespace lorax::lora {

inline cuda::Pool pool_args(const PoolView& p) {
  const auto s = p.page_table.sizes();
  return {p.arena.data_ptr(), p.page_table.data_ptr<int32_t>(), p.ranks.data_ptr<int32_t>(), s[0], s[1], s[2], s[4],
          s[5], p.layer, p.modules.front(), log2_exact(p.page_size, "lora (CUDA): page_size")};
}

static_assert(cuda::kModulesPerCall == static_cast<int>(kMaxModules));

inline cuda::Modules module_args(const PoolView& p, const std::vector<int64_t>& columns) {
  cuda::Modules m{};
  m.count = static_cast<int>(p.modules.size());
  for (int i = 0; i < m.count; ++i) m.index[i] = p.modules[i];
  for (size_t i = 0; i < columns.size(); ++i) m.column[i] = columns[i];
  return m;
}

}  // namespace lorax::lora

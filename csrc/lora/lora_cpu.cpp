// SGMV / BGMV on the CPU: fp32 accumulation, weights read through the pool's page table.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>

#include "lora/lora.h"

namespace lorax::lora {
namespace {

// Where rows of one adapter's A (ab = 0) or B^T (ab = 1) live: page_of(row, chunk).
struct RowPages {
  const int32_t* table;  // [max_rank, chunks] for (adapter, layer, module, ab)
  int64_t chunks, rank;
  int32_t page_of(int64_t row, int64_t chunk) const { return table[row * chunks + chunk]; }
};

RowPages row_pages(const PoolView& p, int64_t adapter, int64_t module, int64_t ab) {
  const auto s = p.page_table.sizes();  // [slots, layers, modules, 2, max_rank, chunks]
  const int64_t lm = (adapter * s[1] + p.layer) * s[2] + module;
  return {p.page_table.data_ptr<int32_t>() + (lm * 2 + ab) * s[4] * s[5], s[5], p.ranks.data_ptr<int32_t>()[lm]};
}

// SGMV's segments come from the caller: starts must rise from >= 0 to at most the call's tokens and adapters lie in
// [-1, slots) (BGMV's groups do by construction). Reading them here costs nothing; the CUDA kernels clamp instead.
void check_segments(const Groups& g, int64_t tokens, int64_t slots) {
  const int32_t *s = g.starts.data_ptr<int32_t>(), *a = g.adapters.data_ptr<int32_t>();
  const int64_t n = g.adapters.numel();
  for (int64_t i = 0; i <= n; ++i)
    TORCH_CHECK(s[i] >= (i == 0 ? 0 : s[i - 1]) && s[i] <= tokens, "sgmv: seg_starts must rise from >= 0 to at most ",
                "the ", tokens, " tokens (segment s is rows [seg_starts[s], seg_starts[s + 1])); seg_starts[", i,
                "] is ", s[i], i == 0 ? std::string() : " after " + std::to_string(s[i - 1]));
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(a[i] >= -1 && a[i] < slots, "sgmv: segment ", i, " has adapter slot ", a[i], "; the pool has ", slots,
                " slots (-1: no adapter)");
}

// Calls fn(adapter, token) for every token of every group that has an adapter, groups in parallel.
template <typename Fn>
void for_each_token(const Groups& g, Fn fn) {
  const int32_t* starts = g.starts.data_ptr<int32_t>();
  const int32_t* adapters = g.adapters.data_ptr<int32_t>();
  const int32_t* order = g.order.defined() ? g.order.data_ptr<int32_t>() : nullptr;
  at::parallel_for(0, g.adapters.numel(), 1, [&](int64_t g0, int64_t g1) {
    for (int64_t gi = g0; gi < g1; ++gi) {
      if (adapters[gi] < 0) continue;
      for (int64_t pos = starts[gi]; pos < starts[gi + 1]; ++pos) fn(adapters[gi], order ? order[pos] : pos);
    }
  });
}

void shrink_kernel(const at::Tensor& x, const PoolView& p, const Groups& g, at::Tensor& v) {
  const int64_t in = x.size(1), width = v.size(1), max_rank = p.page_table.size(4), page = p.page_size;
  check_segments(g, x.size(0), p.page_table.size(0));
  v.zero_();
  float* vp = v.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sgmv_shrink_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* arena = p.arena.data_ptr<scalar_t>();
    for_each_token(g, [&](int64_t a, int64_t t) {
      for (size_t m = 0; m < p.modules.size(); ++m) {
        const RowPages rows = row_pages(p, a, p.modules[m], 0);
        for (int64_t i = 0; i < rows.rank; ++i) {  // v[t, m * max_rank + i] = x[t] . A_m[a][i]
          float acc = 0.0f;
          for (int64_t k0 = 0, c = 0; k0 < in; k0 += page, ++c) {
            const scalar_t* w = arena + int64_t{rows.page_of(i, c)} * page;
            for (int64_t k = k0; k < std::min(k0 + page, in); ++k)
              acc += static_cast<float>(xp[t * in + k]) * static_cast<float>(w[k - k0]);
          }
          vp[t * width + static_cast<int64_t>(m) * max_rank + i] = acc;
        }
      }
    });
  });
}

void expand_kernel(at::Tensor& y, const at::Tensor& v, const PoolView& p, const at::Tensor& scales, const Groups& g,
                   const std::vector<int64_t>& columns) {
  const int64_t ld = y.stride(0), width = v.size(1), max_rank = p.page_table.size(4), page = p.page_size;
  check_segments(g, y.size(0), p.page_table.size(0));
  const float* vp = v.data_ptr<float>();
  const float* sp = scales.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "sgmv_expand_cpu", [&] {
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* arena = p.arena.data_ptr<scalar_t>();
    for_each_token(g, [&](int64_t a, int64_t t) {
      for (size_t m = 0; m < p.modules.size(); ++m) {
        const RowPages rows = row_pages(p, a, p.modules[m], 1);
        const float* vt = vp + t * width + static_cast<int64_t>(m) * max_rank;
        scalar_t* yt = yp + t * ld + columns[m];
        for (int64_t o = 0; o < columns[m + 1] - columns[m]; ++o) {  // y[t, o] += scale * sum_i v[t, i] B_m[a][o][i]
          float acc = 0.0f;
          for (int64_t i = 0; i < rows.rank; ++i)
            acc += vt[i] * static_cast<float>(arena[int64_t{rows.page_of(i, o / page)} * page + o % page]);
          yt[o] = static_cast<scalar_t>(static_cast<float>(yt[o]) + sp[a] * acc);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lorax_core, CPU, m) {
  LORAX_REGISTER_LORA_OPS(m, shrink_kernel, expand_kernel, nullptr, groups_from_indices);
  m.impl("add_rms_norm_sgmv_shrink", &add_rms_norm_sgmv_shrink_composite);
}

}  // namespace lorax::lora

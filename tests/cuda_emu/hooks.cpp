// Emulator-only ops for the tests (build.py compiles this file into the emulated library only).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda_emu.h"  // after torch's headers: its macros (threadIdx, __shared__, ...) are for the kernels

namespace {

// The next emulated launch reads dst as it is before its pdl_prologue(), and src's values after (cuda_emu.h's
// late_write): as if the kernel before were still writing src into dst.
void late_write(const at::Tensor& dst, const at::Tensor& src) {
  TORCH_CHECK(dst.is_contiguous() && src.is_contiguous() && dst.scalar_type() == src.scalar_type() &&
                  dst.numel() == src.numel(),
              "late_write: dst and src must be contiguous, of one dtype and size");
  ::emu::late_write(dst.data_ptr(), src.data_ptr(), dst.nbytes());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lorax_emu, m) { m.def("late_write(Tensor dst, Tensor src) -> ()", &late_write); }

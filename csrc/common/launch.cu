// When launch() (launch.cuh) uses programmatic dependent launch.
#include <atomic>

#include "common/launch.cuh"

namespace lorax {
namespace {

std::atomic<bool> g_enabled{true};

// CUDA 12.4+ for both: stream capture (CUDA graphs) of PDL launches needs 12.3, and 12.4 fixed its early bugs.
bool cuda_supports_pdl() {
  static const bool supported = [] {
    int runtime = 0, driver = 0;
    if (cudaRuntimeGetVersion(&runtime) != cudaSuccess || cudaDriverGetVersion(&driver) != cudaSuccess) return false;
    return runtime >= 12040 && driver >= 12040;
  }();
  return supported;
}

bool device_supports_pdl(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> major[kMaxDevices] = {};  // 0: not asked yet
  if (device < 0 || device >= kMaxDevices) return false;
  int m = major[device].load(std::memory_order_relaxed);
  if (m == 0) {
    if (cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
    major[device].store(m, std::memory_order_relaxed);
  }
  return m >= 9;
}

}  // namespace

bool programmatic_launch_enabled() {
  if (!g_enabled.load(std::memory_order_relaxed) || !cuda_supports_pdl()) return false;
  int device = 0;
  return cudaGetDevice(&device) == cudaSuccess && device_supports_pdl(device);
}

bool set_programmatic_launch(bool enabled) { return g_enabled.exchange(enabled); }

}  // namespace lorax

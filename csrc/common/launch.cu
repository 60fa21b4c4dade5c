// When launch() (launch.cuh) uses programmatic dependent launch, and whether launch_cluster() may use clusters.
#include <atomic>
#include <map>
#include <mutex>
#include <utility>

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

// The current device's compute capability major (0 where it cannot say), asked once per device.
int current_major() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> major[kMaxDevices] = {};  // 0: not asked yet
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return 0;
  int m = major[device].load(std::memory_order_relaxed);
  if (m == 0) {
    if (cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return 0;
    major[device].store(m, std::memory_order_relaxed);
  }
  return m;
}

}  // namespace

bool programmatic_launch_enabled() {
  return g_enabled.load(std::memory_order_relaxed) && cuda_supports_pdl() && current_major() >= 9;
}

bool cluster_launch_supported() { return current_major() >= 9; }

bool set_programmatic_launch(bool enabled) { return g_enabled.exchange(enabled); }

void allow_dynamic_shared(const void* kernel, size_t bytes) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> allowed;  // (kernel, device) -> the most bytes allowed
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return;
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& most = allowed[{kernel, device}];
  if (bytes <= most) return;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)) ==
      cudaSuccess)
    most = bytes;
}

}  // namespace lorax

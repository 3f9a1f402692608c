// Device facts and CUDA memory statistics for lorakit (crates/lora-sdxl/src/device.rs).
//
// Only libtorch's device-generic interfaces are used — the CUDA hooks for
// versions, the global context for the attention (SDPA) backends, the
// device allocator for memory statistics — so this file needs no CUDA
// headers and builds against a CPU-only libtorch as well; each call answers
// "unknown" (-1) where CUDA is absent.
//
// The CUDA sync-debug switch (`lorakit_sync_debug`) is the one torch's
// `torch.cuda.set_sync_debug_mode` sets: a process-wide object in
// libc10_cuda.so, found by name at run time (it is exported as a unique
// global symbol), so that a diagnostic run can count every host sync.

#include <ATen/Context.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/CachingDeviceAllocator.h>

#include <dlfcn.h>

#include "errors.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {
template <typename F>
int64_t or_unknown(F f) {
  try {
    return static_cast<int64_t>(f());
  } catch (...) {
    return -1;
  }
}
}  // namespace

extern "C" {

// out[0]: CUDA runtime version libtorch was built with (e.g. 13000 for
// 13.0), out[1]: cuDNN version it was built with (e.g. 91900), out[2]:
// cuDNN version loaded at run time, out[3]: GPUs visible. -1 = unknown.
void lorakit_cuda_versions(int64_t* out) {
  const auto& hooks = at::detail::getCUDAHooks();
  out[0] = or_unknown([&] { return hooks.versionCUDART(); });
  out[1] = or_unknown([&] { return hooks.hasCuDNN() ? hooks.versionCuDNN() : -1; });
  out[2] = or_unknown([&] { return hooks.hasCuDNN() ? hooks.versionRuntimeCuDNN() : -1; });
  out[3] = or_unknown([&] { return hooks.hasCUDA() ? hooks.getNumGPUs() : 0; });
}

// The scaled-dot-product-attention backends enabled: bit 0 flash, 1
// memory-efficient, 2 math, 3 cuDNN.
int64_t lorakit_sdpa_backends() {
  auto& ctx = at::globalContext();
  return (ctx.userEnabledFlashSDP() ? 1 : 0) | (ctx.userEnabledMemEfficientSDP() ? 2 : 0) |
         (ctx.userEnabledMathSDP() ? 4 : 0) | (ctx.userEnabledCuDNNSDP() ? 8 : 0);
}

// Memory of cuda:`index` from the caching allocator, in bytes: out[0]
// allocated now, out[1] peak allocated, out[2] reserved now, out[3] peak
// reserved (torch.cuda.memory_allocated / max_memory_allocated /
// memory_reserved / max_memory_reserved). Returns nullptr or an error to
// free with `lorakit_free`.
char* lorakit_cuda_memory(int64_t index, int64_t* out) {
  return lorakit::guarded([&] {
    auto* a = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    auto s = a->getDeviceStats(static_cast<c10::DeviceIndex>(index));
    constexpr size_t all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = s.allocated_bytes[all].current;
    out[1] = s.allocated_bytes[all].peak;
    out[2] = s.reserved_bytes[all].current;
    out[3] = s.reserved_bytes[all].peak;
  });
}

// Starts the peak counters of cuda:`index` again from the current use
// (torch.cuda.reset_peak_memory_stats).
char* lorakit_cuda_reset_peak(int64_t index) {
  return lorakit::guarded([&] {
    auto* a = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    a->resetPeakStats(static_cast<c10::DeviceIndex>(index));
  });
}

// torch.cuda.set_sync_debug_mode: 0 off, 1 warn at every synchronising
// CUDA call, 2 error. Returns 0 when libc10_cuda.so is not loaded.
int lorakit_sync_debug(int mode) {
  // c10::cuda::warning_state()'s static WarningState, whose only member is
  // the SyncDebugMode enum (c10/cuda/CUDAFunctions.h).
  void* state = dlsym(RTLD_DEFAULT, "_ZZN3c104cuda13warning_stateEvE14warning_state_");
  if (state == nullptr) return 0;
  *static_cast<int*>(state) = mode;
  return 1;
}

}  // extern "C"

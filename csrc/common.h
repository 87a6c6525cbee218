// Shared by every op family: dtype codes (match ops/_common.py DTYPE_CODES), error checks, launch helpers.
// Launchers take raw device pointers as uintptr_t and the stream as uintptr_t, so no CUDA or torch type
// crosses the binding.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace l3k {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, E4M3 = 3 };

inline DType to_dtype(int code, const char* arg) {
  if (code < 0 || code > 3) throw std::invalid_argument(std::string(arg) + ": unknown dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

// An opt-in switch read from the environment at every call (tests and benches flip it): set to exactly "1".
inline bool env_switch_on(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// A default-on switch, likewise: off only when set to exactly "0".
inline bool env_switch_off(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "0") == 0;
}

// Throws std::invalid_argument (Python ValueError) naming the argument.
inline void require(bool ok, const char* arg, const std::string& what) {
  if (!ok) throw std::invalid_argument(std::string(arg) + ": " + what);
}

}  // namespace l3k

#if defined(__CUDACC__) || defined(L3K_EMU)  // L3K_EMU: the CPU emulator (csrc/emu/emu.h)
#include <cuda_runtime.h>

namespace l3k {
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}
inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
template <typename T>
inline T* as_ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }
}  // namespace l3k

#define L3K_CHECK_LAUNCH(name) ::l3k::check_cuda(cudaGetLastError(), name)

namespace l3k {
// Programmatic dependent launch (PDL, sm_90), for the decode step's chain of short kernels: a kernel launched by
// launch_pdl may start while the previous kernel on the stream is still finishing, so its first independent work
// (the GEMV's weight loads) overlaps that kernel's tail and the launch gap. Such a kernel must call pdl_wait() in
// every thread before it reads or writes memory that earlier kernels touch: their outputs, and its own outputs too
// (the caching allocator hands out freed buffers in stream order). A dependent's CTAs schedule only once every CTA
// of its primary has triggered (so all of them are resident): an early dependent cannot starve its primary. What a
// kernel may read before its wait must not be written by the kernel just before it (the decode GEMV's weights:
// parameters, which no decode step writes; a caller must not pass as w the output of the previous op). On by default;
// L3K_PDL=0 launches them plainly (bench/device_check.sh sets it when PDL's tests fail), and then pdl_wait()
// returns at once.
#ifdef L3K_EMU  // launches run one after another there
__device__ __forceinline__ void pdl_wait() {}
__device__ __forceinline__ void pdl_launch_dependents() {}
#else
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
// The next PDL launch may schedule its CTAs once every CTA of this grid has called this or exited.
__device__ __forceinline__ void pdl_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
#endif

inline bool pdl_enabled() { return !env_switch_off("L3K_PDL"); }

// A cudaLaunchConfig_t with its attributes: programmatic serialization (pdl), and clusters of `cluster_x` CTAs along
// x when that is above 1 (grid.x must be a multiple of it). For cudaLaunchKernelEx and the occupancy queries.
// Not copyable: `config.attrs` points into `attr`.
struct LaunchConfig {
  cudaLaunchAttribute attr[2];
  cudaLaunchConfig_t config{};

  LaunchConfig(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, unsigned cluster_x, bool pdl) {
    unsigned n = 0;
    if (pdl) {
      attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr[n++].val.programmaticStreamSerializationAllowed = 1;
    }
    if (cluster_x > 1) {
      attr[n].id = cudaLaunchAttributeClusterDimension;
      attr[n].val.clusterDim.x = cluster_x;
      attr[n].val.clusterDim.y = attr[n].val.clusterDim.z = 1;
      ++n;
    }
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = attr;
    config.numAttrs = n;
  }
  LaunchConfig(const LaunchConfig&) = delete;
  LaunchConfig& operator=(const LaunchConfig&) = delete;
};

// kernel<<<grid, block, smem, stream>>>(args...), with the programmatic-serialization attribute when PDL is on,
// and as clusters of `cluster_x` CTAs along x when that is above 1.
template <typename... Params, typename... Args>
void launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                unsigned cluster_x, Args... args) {
  LaunchConfig launch(grid, block, smem, stream, cluster_x, pdl_enabled());
  check_cuda(cudaLaunchKernelEx(&launch.config, kernel, static_cast<Params>(args)...), "cudaLaunchKernelEx");
}
}  // namespace l3k
#endif

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

#ifdef __CUDACC__
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
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
// The next PDL launch may schedule its CTAs once every CTA of this grid has called this or exited.
__device__ __forceinline__ void pdl_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

// RoPE's rotation of one interleaved pair, (x0 + i x1)(c + i s) in fp32, with the contraction written out (one
// rounded product, then one fma per output) so that every kernel that rotates (rope_cache.cu, the decode GEMV's qkv
// epilogue) produces the same bits whatever ptxas would have fused. Pass -s for the inverse rotation.
__device__ __forceinline__ float2 rope_pair(float x0, float x1, float c, float s) {
  return make_float2(fmaf(x0, c, -__fmul_rn(x1, s)), fmaf(x0, s, __fmul_rn(x1, c)));
}

inline bool pdl_enabled() { return !env_switch_off("L3K_PDL"); }

// kernel<<<grid, block, smem, stream>>>(args...), with the programmatic-serialization attribute when PDL is on,
// and as clusters of `cluster_x` CTAs along x when that is above 1 (grid.x must be a multiple of it).
template <typename... Params, typename... Args>
void launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                unsigned cluster_x, Args... args) {
  cudaLaunchAttribute attr[2];
  unsigned n = 0;
  if (pdl_enabled()) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster_x > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = cluster_x;
    attr[n].val.clusterDim.y = attr[n].val.clusterDim.z = 1;
    ++n;
  }
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = n;
  check_cuda(cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...), "cudaLaunchKernelEx");
}
}  // namespace l3k
#endif

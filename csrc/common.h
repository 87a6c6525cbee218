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
#endif

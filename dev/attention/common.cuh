// common.cuh: what the dev/attention programs share besides the kernels: error checks, random inputs, a non-finite
// count, and a wait that reports a hang (a pipeline barrier that never completes) instead of blocking forever.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#define CUDA_CHECK(expr)                                                                                   \
  do {                                                                                                     \
    cudaError_t err_ = (expr);                                                                             \
    if (err_ != cudaSuccess) {                                                                             \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(err_)); \
      std::exit(1);                                                                                        \
    }                                                                                                      \
  } while (0)

__device__ __forceinline__ uint32_t hash_u32(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return uint32_t(x);
}

// Standard normal values (Box-Muller on a counter hash), rounded to bf16.
__global__ void fill_normal_kernel(__nv_bfloat16* x, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float u1 = (hash_u32(seed * 0x9e3779b97f4a7c15ULL + 2 * i) + 1.0f) * 2.3283064e-10f;  // (0, 1]
    const float u2 = hash_u32(seed * 0x9e3779b97f4a7c15ULL + 2 * i + 1) * 2.3283064e-10f;
    x[i] = __float2bfloat16(sqrtf(-2.f * logf(u1)) * cospif(2.f * u2));
  }
}

template <class T>
__global__ void count_nonfinite_kernel(const T* x, int64_t n, unsigned long long* count) {
  unsigned long long local = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    local += !isfinite(float(x[i]));
  }
  if (local) atomicAdd(count, local);
}

// The naive fp32 causal attention of one query row (b, h, i), computed by a whole block: q [B, S, Hq, D], k/v
// [B, S, Hkv, D] bf16 (D <= 128); p is the block's scratch for the row's S probabilities (global or shared memory). Calls
// store(d, o_d) for the output columns this thread owns and returns the row's lse (natural log), valid in every
// thread. The reference of the forward check (harness.cuh) and of the backward's inputs (v3_wgmma_bwd.cu).
template <class Store>
__device__ float naive_attention_row(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, int b,
                                     int h, int i, int seqlen, int heads_q, int heads_kv, int D, float scale, float* p,
                                     Store store) {
  const int hk = h / (heads_q / heads_kv);
  __shared__ float q_s[128], red[32];
  const __nv_bfloat16* q_row = q + ((int64_t(b) * seqlen + i) * heads_q + h) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) q_s[d] = __bfloat162float(q_row[d]);
  __syncthreads();
  float mx = -INFINITY;
  for (int j = threadIdx.x; j <= i; j += blockDim.x) {
    const __nv_bfloat16* k_row = k + ((int64_t(b) * seqlen + j) * heads_kv + hk) * D;
    float dot = 0.f;
    for (int d = 0; d < D; ++d) dot += q_s[d] * __bfloat162float(k_row[d]);
    p[j] = dot * scale;
    mx = fmaxf(mx, p[j]);
  }
  for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = mx;
  __syncthreads();
  mx = -INFINITY;
  for (int w = 0; w < int(blockDim.x / 32); ++w) mx = fmaxf(mx, red[w]);
  __syncthreads();
  float sum = 0.f;
  for (int j = threadIdx.x; j <= i; j += blockDim.x) {
    p[j] = expf(p[j] - mx);
    sum += p[j];
  }
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = sum;
  __syncthreads();  // also makes every p[j] written above visible to the whole block
  sum = 0.f;
  for (int w = 0; w < int(blockDim.x / 32); ++w) sum += red[w];
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j <= i; ++j) acc += p[j] * __bfloat162float(v[((int64_t(b) * seqlen + j) * heads_kv + hk) * D + d]);
    store(d, acc / sum);
  }
  return mx + logf(sum);
}

// Waits for `done`; false (after printing `what`) when it has not completed within `seconds`.
inline bool wait_or_hang(cudaEvent_t done, int seconds, const char* what) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
  cudaError_t state;
  while ((state = cudaEventQuery(done)) == cudaErrorNotReady) {
    if (std::chrono::steady_clock::now() > deadline) {
      std::printf("%s: still running after %d s, a pipeline barrier never completed (hang)\n", what, seconds);
      return false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  CUDA_CHECK(state);
  return true;
}

// Command line of every program here: [--check-only] [--max-seqlen N] [--head-dim 64|128] | --layout-check.
struct Options {
  bool check_only = false;   // no timing
  bool layout_only = false;  // the host self-test alone
  int max_seqlen = 1 << 30;  // skip longer shapes (compute-sanitizer runs)
  int head_dim = 0;          // 64 or 128; 0: both, 128 first (the Llama 3 8B-405B head dim, then 3.2 1B's)
  bool runs(int d) const { return head_dim == 0 || head_dim == d; }
};

// Parses argv (exits with 2 and a usage line on anything else), sets stdout line-buffered (a timeout that kills
// a hung run keeps every finished line), and runs `layout_selftest`: the exit status when it fails or when
// --layout-check asked for it alone, else -1 (go on).
inline int start(int argc, char** argv, Options& opt, bool (*layout_selftest)()) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--check-only") == 0) {
      opt.check_only = true;
    } else if (std::strcmp(argv[i], "--layout-check") == 0) {
      opt.layout_only = true;
    } else if (std::strcmp(argv[i], "--max-seqlen") == 0 && i + 1 < argc) {
      opt.max_seqlen = std::atoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--head-dim") == 0 && i + 1 < argc &&
               (std::strcmp(argv[i + 1], "64") == 0 || std::strcmp(argv[i + 1], "128") == 0)) {
      opt.head_dim = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--check-only] [--max-seqlen N] [--head-dim 64|128] | --layout-check\n",
                   argv[0]);
      std::exit(2);
    }
  }
  const bool layout_ok = layout_selftest();
  if (!layout_ok || opt.layout_only) return layout_ok ? 0 : 1;
  return -1;
}

// The device's name and architecture on stdout; false unless it is a Hopper (sm_90) GPU.
inline bool hopper_device(const char* version) {
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s on %s (sm_%d%d)\n", version, prop.name, prop.major, prop.minor);
  if (prop.major != 9) std::fprintf(stderr, "these kernels need sm_90a (Hopper)\n");
  return prop.major == 9;
}

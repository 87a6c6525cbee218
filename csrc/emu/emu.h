// A CPU emulator for this project's SIMT and mma.sync kernels, so that their logic is checked on a machine with no
// GPU (tests/test_emu.py). Not part of the CUDA build: csrc/emu/build.py compiles the kernel sources with the host
// compiler, this header force-included (-include) and L3K_EMU defined, into the Python module `_C_emu`.
//
// Model: every thread of a CTA (all CTAs of a cluster) is a fiber; a fiber runs until it reaches a barrier or a warp
// collective (ldmatrix, mma.sync, shuffles), where it waits for the others. The last lane of a warp to arrive at a
// collective computes every lane's result, so a warp executes ldmatrix and mma with the operands all 32 lanes hold
// at that point, as the hardware does. Shared memory (dynamic and static) is a per-CTA arena filled with 0xFF bytes
// (NaN in every float type) so a read of unwritten shared memory shows, again when the CTA exits (a cluster peer
// reading it later sees NaN). A cp.async destination reads 0xFF from the issue until a wait_group completes its
// group. Threads resume in index order on odd launches and in reverse on even ones (L3K_EMU_ORDER=forward|reverse
// pins it), so a missing barrier shows whichever way the data flows. Mistakes a GPU would hang or fault on are
// errors: a barrier no thread can pass (deadlock), a collective that lanes reach at different places or after some
// exited, a shared-memory address past the CTA's size, dynamic shared memory above the kernel's opt-in.
// What it cannot check: timing, races a fixed interleaving hides, global-memory bounds, and Hopper-only hardware
// (TMA, wgmma: the CUTLASS and sm90 kernels are not emulated). Its arithmetic is not the hardware's: mma sums
// exactly and rounds once (the tensor cores truncate partial sums), host exp2f / expf / rsqrtf are correctly
// rounded, and a * b + c is not contracted into an fma (nvcc contracts by default); explicit fmaf is an fma.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>

// Kernel code compiles as host code.
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __shared__
#define __shared__ emu_shared_declaration_not_rewritten_by_build_py  // build.py rewrites every one (per-CTA)
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace emu {

// ------------------------------------------------------------------------------------------- the runtime
unsigned char* shared_arena();  // this CTA's shared memory (dynamic part first)
size_t shared_size();           // its bytes so far: the launch's dynamic size, then each static variable declared
// A static __shared__ variable (build.py rewrites each declaration into this): one per CTA, in its arena.
void* static_shared(size_t bytes, size_t align, unsigned id);
unsigned char* peer_arena(int cluster_rank);
int cluster_rank();
int cluster_size();
void sync_threads();
void sync_cluster();
[[noreturn]] void fail(const char* what);

// A warp collective: each lane passes its input and output; the last lane of `mask` to arrive runs fn over all
// lanes' inputs and outputs. Lanes must reach the same fn.
// `site` (a return address) tells apart the same collective reached at different places.
using Collective = void (*)(void* const* in, void* const* out, unsigned mask);
void warp_collective(unsigned mask, void* in, void* out, Collective fn, const void* site = nullptr);

// Runs fn (the kernel with its parameters bound) on every thread of the grid, `cluster_x` CTAs along x as a cluster.
// Checks the dynamic shared memory against sm_90's limit and the kernel's opt-in above 48 KB.
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem, unsigned cluster_x,
              const std::function<void()>& fn);
void set_dynamic_opt_in(const void* kernel, size_t bytes);

// Kernels launched since the module loaded (tests check that an op ran a kernel, not its reference).
long long launches();

// How many clusters of a size the emulated device co-schedules (decode's cluster merge asks): the env var
// L3K_EMU_MAX_CLUSTER (default 16) is the largest cluster it accepts.
int max_cluster();

template <typename... P, typename... A>
void run_kernel(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, unsigned cluster_x, A... args) {
  const std::tuple<P...> params(static_cast<P>(args)...);
  run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem, cluster_x, [&] { std::apply(kernel, params); });
}

// kernel<<<grid, block, smem, stream>>>(args) becomes emu::launch(kernel, grid, block, smem, stream)(args).
template <typename... P>
auto launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return [=](auto... args) { run_kernel(kernel, grid, block, smem, 1u, args...); };
}

// ------------------------------------------------------------------------------------------- warp primitives
// Not inlined, so that its return address names the call site (lanes at different shuffles are an error).
template <typename T>
__attribute__((noinline)) T shfl(unsigned mask, T v, int lane_arg, int width, int mode) {  // 0 xor, 1 idx, 2 down, 3 up
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  struct In {
    T v;
    int arg, width, mode;
  } in{v, lane_arg, width, mode};
  T out;
  warp_collective(mask, &in, &out, [](void* const* ins, void* const* outs, unsigned m) {
    for (int l = 0; l < 32; ++l) {
      if (!(m >> l & 1)) continue;
      const In& me = *static_cast<In*>(ins[l]);
      const int base = l & ~(me.width - 1);
      int src = me.mode == 0 ? l ^ me.arg  // past the lane's segment: its own value
                : me.mode == 1 ? base + (me.arg & (me.width - 1))
                : me.mode == 2 ? ((l - base) + me.arg < me.width ? l + me.arg : l)
                               : ((l - base) - me.arg >= 0 ? l - me.arg : l);
      if (src < base || src >= base + me.width) src = l;
      if (!(m >> src & 1)) fail("shuffle reads a lane outside its mask");
      *static_cast<T*>(outs[l]) = static_cast<In*>(ins[src])->v;
    }
  }, __builtin_return_address(0));
  return out;
}

void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_addr, bool trans);
void stmatrix_x4_trans(uint32_t smem_addr, const uint32_t (&r)[4]);
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);
void cp_async16(uint32_t smem_dst, const void* src, bool pred);
void cp_async_commit();
void cp_async_wait(int newest_pending);  // complete all committed groups but the newest N

}  // namespace emu

// Set by the scheduler before it resumes a thread (one runs at a time).
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

inline void __syncthreads() { emu::sync_threads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  int dummy = 0;
  emu::warp_collective(mask, &dummy, &dummy, [](void* const*, void* const*, unsigned) {});
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) { return emu::shfl(mask, v, lane_mask, width, 0); }
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) { return emu::shfl(mask, v, src, width, 1); }
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) { return emu::shfl(mask, v, int(d), width, 2); }
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) { return emu::shfl(mask, v, int(d), width, 3); }

// CUDA's device min / max overloads.
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }

template <typename T>
inline T __ldg(const T* p) { return *p; }
// Atomics: one thread runs at a time, so a plain read-modify-write is atomic.
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}
inline float2 atomicAdd(float2* p, float2 v) {
  const float2 old = *p;
  *p = make_float2(old.x + v.x, old.y + v.y);
  return old;
}
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline int __float_as_int(float x) { int u; std::memcpy(&u, &x, 4); return u; }
inline size_t __cvta_generic_to_shared(const void* p) {
  const auto* b = static_cast<const unsigned char*>(p);
  const unsigned char* base = emu::shared_arena();
  if (b < base || b >= base + emu::shared_size()) emu::fail("__cvta_generic_to_shared: not a shared-memory address");
  return size_t(b - base);
}

// The runtime calls the launchers make, answered by the emulator (macros: the real declarations are already seen).
namespace emu {
template <typename K>
cudaError_t func_set_attribute(K kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize)
    set_dynamic_opt_in(reinterpret_cast<const void*>(kernel), size_t(value));
  return cudaSuccess;
}
template <typename K>
cudaError_t occupancy_blocks(int* n, K, int, size_t) { *n = 2; return cudaSuccess; }
// A launch configuration's cluster size along x (1: no cluster attribute).
inline unsigned cluster_x(const cudaLaunchConfig_t* cfg) {
  for (unsigned i = 0; i < cfg->numAttrs; ++i)
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension) return cfg->attrs[i].val.clusterDim.x;
  return 1;
}
template <typename K>
cudaError_t occupancy_clusters(int* n, K, const cudaLaunchConfig_t* cfg) {
  *n = int(cluster_x(cfg)) <= max_cluster() ? 1 : 0;
  return cudaSuccess;
}
template <typename... P, typename... A>
cudaError_t launch_ex(const cudaLaunchConfig_t* cfg, void (*kernel)(P...), A... args) {
  run_kernel(kernel, cfg->gridDim, cfg->blockDim, cfg->dynamicSmemBytes, cluster_x(cfg), args...);
  return cudaSuccess;
}
inline cudaError_t memset_async(void* p, int v, size_t n, cudaStream_t = nullptr) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t get_device(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t ok() { return cudaSuccess; }
inline const char* error_string(cudaError_t) { return "emulated CUDA error"; }
}  // namespace emu
#define cudaFuncSetAttribute ::emu::func_set_attribute
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor ::emu::occupancy_blocks
#define cudaOccupancyMaxActiveClusters ::emu::occupancy_clusters
#define cudaLaunchKernelEx ::emu::launch_ex
#define cudaMemsetAsync ::emu::memset_async
#define cudaGetDevice ::emu::get_device
#define cudaGetLastError ::emu::ok
#define cudaGetErrorString ::emu::error_string

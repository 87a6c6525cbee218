// Kernels that break the rules on purpose, so tests/test_emu.py can check that the emulator reports each mistake
// (emulator builds only: a .cpp, which the CUDA build does not compile). emu_selftest(name, out) runs one.
#include <cooperative_groups.h>

#include <stdexcept>
#include <string>

#include "attention/flash_common.cuh"
#include "emu/emu.h"

namespace {

// Lane 0 of warp 1 waits at the block barrier while the rest of its warp waits for it at a shuffle.
void deadlock_kernel(float* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (warp == 1 && lane == 0) __syncthreads();
  else if (warp == 1) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
  else __syncthreads();
}

// Two halves of a warp reach the same shuffle instruction at different places.
void divergent_kernel(float* out) {
  if ((threadIdx.x & 31) < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
  else out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 2.f, 1);
}

// Reads a shared-memory word no thread wrote.
void uninit_shared_kernel(float* out) { out[threadIdx.x] = reinterpret_cast<float*>(emu::shared_arena())[threadIdx.x]; }

// cp.async of 16 bytes, read back before (out[0..3]) and after (out[4..7]) its group is waited for.
void cp_async_kernel(float* out, const float* src) {
  if (threadIdx.x != 0) return;
  float* dst = reinterpret_cast<float*>(emu::shared_arena());
  l3k::attn::cp_async16(dst, src, true);
  l3k::attn::cp_async_commit();
  for (int i = 0; i < 4; ++i) out[i] = dst[i];
  l3k::attn::cp_async_wait_all();
  for (int i = 0; i < 4; ++i) out[4 + i] = dst[i];
}

// Rank 1 of a 2-CTA cluster reads rank 0's shared memory after rank 0 has exited (no closing cluster.sync).
void exited_peer_kernel(float* out) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  float* mine = reinterpret_cast<float*>(emu::shared_arena());
  mine[threadIdx.x] = float(cluster.block_rank());
  cluster.sync();
  if (cluster.block_rank() == 1) {
    __syncthreads();  // (rank 0 has no further barrier: it runs to its end first)
    out[threadIdx.x] = *cluster.map_shared_rank(mine + threadIdx.x, 0);
  }
}

void noop_kernel(float*) {}

}  // namespace

std::string emu_selftest(const std::string& name, std::uintptr_t out_ptr, std::uintptr_t src_ptr) {
  auto* out = reinterpret_cast<float*>(out_ptr);
  if (name == "deadlock") emu::launch(deadlock_kernel, dim3(1), dim3(64))(out);
  else if (name == "divergent") emu::launch(divergent_kernel, dim3(1), dim3(32))(out);
  else if (name == "uninit_shared") emu::launch(uninit_shared_kernel, dim3(1), dim3(32), 128)(out);
  else if (name == "cp_async") emu::launch(cp_async_kernel, dim3(1), dim3(32), 64)(out, reinterpret_cast<const float*>(src_ptr));
  else if (name == "exited_peer") emu::run_kernel(exited_peer_kernel, dim3(2), dim3(32), 128, 2u, out);
  else if (name == "smem_without_opt_in") emu::launch(noop_kernel, dim3(1), dim3(32), 64 << 10)(out);
  else throw std::invalid_argument("name: no self-test " + name);
  return name;
}

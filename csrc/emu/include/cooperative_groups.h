// The part of cooperative_groups the kernels use (thread-block clusters), for the CPU emulator (csrc/emu/emu.h):
// found before the CUDA toolkit's header through -Icsrc/emu/include.
#pragma once

#include <cstddef>

#include "emu/emu.h"

namespace cooperative_groups {
struct cluster_group {
  unsigned num_blocks() const { return unsigned(emu::cluster_size()); }
  unsigned block_rank() const { return unsigned(emu::cluster_rank()); }
  void sync() const { emu::sync_cluster(); }
  // The address of *p's counterpart in the shared memory of the cluster's CTA `rank`.
  template <typename T>
  T* map_shared_rank(T* p, unsigned rank) const {
    const std::size_t off = __cvta_generic_to_shared(p);
    return reinterpret_cast<T*>(emu::peer_arena(int(rank)) + off);
  }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups

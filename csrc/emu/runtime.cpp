// The CPU emulator's runtime (see emu.h): fibers for the threads of one cluster of CTAs at a time, barriers, warp
// collectives with the PTX fragment layouts of ldmatrix and mma.m16n8k16, cp.async groups, and deadlock detection.
#include <ucontext.h>

#include <cstdlib>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "emu/emu.h"

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace emu {
namespace {

constexpr size_t kArena = 256u << 10;         // what a CTA's shared memory may span here
constexpr size_t kMaxShared = 227u << 10;     // sm_90: dynamic + static shared memory a CTA may have
constexpr size_t kDefaultDynamic = 48u << 10;  // above this a kernel must opt in (cudaFuncSetAttribute)
constexpr size_t kStack = 512u << 10;         // fiber stack (untouched pages cost nothing)

struct Cta;

struct PendingCopy {
  uint32_t dst;
  unsigned char data[16];
};

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack{new char[kStack]};
  uint3 tid;
  Cta* cta;
  int lane = 0, warp = 0;
  bool done = false;
  std::vector<PendingCopy> copies;  // issued cp.async, oldest first
  std::vector<size_t> groups;       // committed groups: their end index in `copies`
};

struct Warp {
  unsigned live = 0, arrived = 0, mask = 0;
  uint64_t gen = 0;
  Collective fn = nullptr;
  const void* site = nullptr;
  void* in[32] = {};
  void* out[32] = {};
};

struct Barrier {
  int live = 0, arrived = 0;
  uint64_t gen = 0;
};

struct Cta {
  uint3 bid;
  int rank = 0;
  std::unique_ptr<unsigned char, decltype(&std::free)> arena{
      static_cast<unsigned char*>(std::aligned_alloc(1024, kArena)), &std::free};
  size_t used = 0;                      // dynamic shared memory, then the static variables as they are declared
  std::map<unsigned, size_t> statics;  // static __shared__ variable id -> offset
  bool exited = false;
  std::vector<Warp> warps;
  Barrier bar;
};

struct Run {
  dim3 grid, block;
  const std::function<void()>* fn = nullptr;
  size_t dynamic_smem = 0;
  bool reverse = false;  // the order fibers are resumed in (alternates by launch)
  std::vector<std::unique_ptr<Cta>> ctas;  // the running cluster, by rank
  std::vector<std::unique_ptr<Fiber>> fibers;
  Barrier cluster_bar;
  Fiber* cur = nullptr;
  ucontext_t sched;
  uint64_t progress = 0;
  std::string error;
};

Run* g_run = nullptr;
long long g_launches = 0;
std::map<const void*, size_t> g_dynamic_opt_in;  // kernel -> cudaFuncAttributeMaxDynamicSharedMemorySize

Fiber& cur() {
  if (g_run == nullptr || g_run->cur == nullptr) throw std::runtime_error("emu: device code called outside a launch");
  return *g_run->cur;
}

void yield() { swapcontext(&g_run->cur->ctx, &g_run->sched); }

// Arrive at a barrier and wait until every live thread it counts has arrived (exited threads count as arrived).
void wait_barrier(Barrier& b) {
  const uint64_t gen = b.gen;
  ++b.arrived;
  ++g_run->progress;
  if (b.arrived >= b.live) {
    b.arrived = 0;
    ++b.gen;
    return;
  }
  while (b.gen == gen) yield();
}

void release_if_complete(Barrier& b) {
  if (b.arrived > 0 && b.arrived >= b.live) {
    b.arrived = 0;
    ++b.gen;
  }
}

void fiber_main() {
  Fiber& f = cur();
  try {
    (*g_run->fn)();
  } catch (const std::exception& e) {
    fail((std::string("exception in device code: ") + e.what()).c_str());
  }
  f.done = true;
  ++g_run->progress;
  Warp& w = f.cta->warps[f.warp];
  w.live &= ~(1u << f.lane);
  if (w.arrived != 0 && (w.mask >> f.lane & 1u)) fail("a lane exited while its warp waits for it at a collective");
  if (--f.cta->bar.live == 0) {  // the CTA is gone: its shared memory too (a cluster peer must not read it now)
    std::memset(f.cta->arena.get(), 0xFF, kArena);
    f.cta->exited = true;
  }
  release_if_complete(f.cta->bar);
  --g_run->cluster_bar.live;
  release_if_complete(g_run->cluster_bar);
  // returning resumes the scheduler (uc_link)
}

void run_cluster(Run& r, unsigned x0, unsigned y, unsigned z, unsigned cluster_x) {
  const unsigned threads = r.block.x * r.block.y * r.block.z;
  const unsigned warps = (threads + 31) / 32;
  r.ctas.clear();
  r.fibers.clear();
  r.cluster_bar = Barrier{int(threads * cluster_x), 0, 0};
  for (unsigned c = 0; c < cluster_x; ++c) {
    auto cta = std::make_unique<Cta>();
    cta->bid = make_uint3(x0 + c, y, z);
    cta->rank = int(c);
    cta->used = r.dynamic_smem;
    std::memset(cta->arena.get(), 0xFF, kArena);  // NaN in every float type: unwritten shared memory shows
    cta->warps.resize(warps);
    cta->bar.live = int(threads);
    for (unsigned t = 0; t < threads; ++t) {
      auto f = std::make_unique<Fiber>();
      f->tid = make_uint3(t % r.block.x, (t / r.block.x) % r.block.y, t / (r.block.x * r.block.y));
      f->cta = cta.get();
      f->lane = int(t % 32);
      f->warp = int(t / 32);
      cta->warps[f->warp].live |= 1u << f->lane;
      getcontext(&f->ctx);
      f->ctx.uc_stack.ss_sp = f->stack.get();
      f->ctx.uc_stack.ss_size = kStack;
      f->ctx.uc_link = &r.sched;
      makecontext(&f->ctx, fiber_main, 0);
      r.fibers.push_back(std::move(f));
    }
    r.ctas.push_back(std::move(cta));
  }
  const size_t n = r.fibers.size();
  for (;;) {
    bool any = false;
    const uint64_t before = r.progress;
    for (size_t i = 0; i < n; ++i) {
      Fiber* f = r.fibers[r.reverse ? n - 1 - i : i].get();
      if (f->done) continue;
      any = true;
      r.cur = f;
      threadIdx = f->tid;
      blockIdx = f->cta->bid;
      swapcontext(&r.sched, &f->ctx);
      r.cur = nullptr;
      if (!r.error.empty()) return;
    }
    if (!any) return;
    if (r.progress == before) {
      r.error = "deadlock: every live thread waits at a barrier or collective that cannot complete (block (" +
                std::to_string(x0) + ", " + std::to_string(y) + ", " + std::to_string(z) + "))";
      return;
    }
  }
}

float half_bits_to_float(uint16_t bits, bool bf16) {
  if (bf16) return __uint_as_float(uint32_t(bits) << 16);
  __half h;
  std::memcpy(&h, &bits, 2);
  return __half2float(h);
}

// The 16-byte row at `addr` of the calling CTA's shared memory, as ldmatrix, stmatrix and cp.async address it:
// 16-byte aligned, inside what the CTA has (dynamic + declared statics). `what` names the access in the error.
unsigned char* shared_row16(uint32_t addr, const char* what) {
  Cta& c = *cur().cta;
  if (addr % 16 != 0) fail((std::string(what) + " not 16-byte aligned").c_str());
  if (addr + 16 > c.used) fail((std::string(what) + " outside the CTA's shared memory").c_str());
  return c.arena.get() + addr;
}

}  // namespace

unsigned char* shared_arena() { return cur().cta->arena.get(); }
size_t shared_size() { return cur().cta->used; }
unsigned char* peer_arena(int rank) {
  if (rank < 0 || rank >= int(g_run->ctas.size())) fail("map_shared_rank: rank outside the cluster");
  if (g_run->ctas[rank]->exited) fail("map_shared_rank: that CTA of the cluster has exited (its shared memory is gone)");
  return g_run->ctas[rank]->arena.get();
}
int cluster_rank() { return cur().cta->rank; }
int cluster_size() { return int(g_run->ctas.size()); }
void sync_threads() { wait_barrier(cur().cta->bar); }
void sync_cluster() {
  cur();
  wait_barrier(g_run->cluster_bar);
}

void* static_shared(size_t bytes, size_t align, unsigned id) {
  Cta& c = *cur().cta;
  auto it = c.statics.find(id);
  if (it == c.statics.end()) {
    const size_t off = (c.used + align - 1) / align * align;
    if (off + bytes > kMaxShared) fail("static __shared__ variables past the CTA's 227 KB of shared memory");
    it = c.statics.emplace(id, off).first;
    c.used = off + bytes;
  }
  return c.arena.get() + it->second;
}

void fail(const char* what) {
  if (g_run == nullptr || g_run->cur == nullptr) throw std::runtime_error(std::string("emu: ") + what);
  if (g_run->error.empty()) {
    const Fiber& f = *g_run->cur;
    g_run->error = std::string(what) + " (block (" + std::to_string(f.cta->bid.x) + ", " +
                   std::to_string(f.cta->bid.y) + ", " + std::to_string(f.cta->bid.z) + "), thread " +
                   std::to_string(f.tid.x) + ")";
  }
  swapcontext(&g_run->cur->ctx, &g_run->sched);  // never resumed
  std::abort();
}

void warp_collective(unsigned mask, void* in, void* out, Collective fn, const void* site) {
  Fiber& f = cur();
  Warp& w = f.cta->warps[f.warp];
  if (!(mask >> f.lane & 1u)) fail("a warp collective's mask leaves out the calling lane");
  if (mask & ~w.live) fail("a warp collective's mask names lanes that have exited");
  if (w.arrived == 0) {
    w.fn = fn;
    w.mask = mask;
    w.site = site;
  } else if (w.fn != fn || w.mask != mask || w.site != site) {
    fail("the lanes of a warp reach different collectives (or one at different places, or with different masks)");
  }
  w.in[f.lane] = in;
  w.out[f.lane] = out;
  w.arrived |= 1u << f.lane;
  ++g_run->progress;
  const uint64_t gen = w.gen;
  if (w.arrived == w.mask) {
    fn(w.in, w.out, mask);
    w.arrived = 0;
    ++w.gen;
    return;
  }
  while (w.gen == gen) yield();
}

void set_dynamic_opt_in(const void* kernel, size_t bytes) { g_dynamic_opt_in[kernel] = bytes; }

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, unsigned cluster_x,
              const std::function<void()>& fn) {
  if (g_run != nullptr) throw std::runtime_error("emu: a launch from device code");
  if (cluster_x == 0 || grid.x % cluster_x != 0) throw std::runtime_error("emu: grid.x is not a multiple of the cluster");
  if (cluster_x > 16) throw std::runtime_error("emu: clusters above 16 CTAs");
  if (smem > kMaxShared) throw std::runtime_error("emu: dynamic shared memory above sm_90's 227 KB");
  if (smem > kDefaultDynamic) {
    auto it = g_dynamic_opt_in.find(kernel);
    if (it == g_dynamic_opt_in.end() || it->second < smem)
      throw std::runtime_error("emu: " + std::to_string(smem) +
                               " bytes of dynamic shared memory without the kernel's opt-in (cudaFuncSetAttribute)");
  }
  ++g_launches;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x * block.y * block.z == 0) return;
  if (block.x * block.y * block.z > 1024) throw std::runtime_error("emu: more than 1024 threads a block");
  Run r;
  r.grid = grid;
  r.block = block;
  r.fn = &fn;
  r.dynamic_smem = smem;
  const char* order = std::getenv("L3K_EMU_ORDER");
  r.reverse = order ? std::string(order) == "reverse" : (g_launches & 1) == 0;
  struct Reset {
    ~Reset() { g_run = nullptr; }
  } reset;
  g_run = &r;
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z && r.error.empty(); ++z)
    for (unsigned y = 0; y < grid.y && r.error.empty(); ++y)
      for (unsigned x = 0; x < grid.x && r.error.empty(); x += cluster_x) run_cluster(r, x, y, z, cluster_x);
  if (!r.error.empty()) throw std::runtime_error("emu: " + r.error);
}

long long launches() { return g_launches; }

int max_cluster() {
  const char* v = std::getenv("L3K_EMU_MAX_CLUSTER");
  return v ? std::atoi(v) : 16;
}

void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr, bool trans) {
  struct In {
    uint32_t addr;
    bool trans;
  } in{addr, trans};
  warp_collective(0xffffffffu, &in, r, [](void* const* ins, void* const* outs, unsigned) {
    auto row = [&](int lane) {  // the 8 halves lane `lane` addresses
      return reinterpret_cast<const uint16_t*>(shared_row16(static_cast<In*>(ins[lane])->addr, "ldmatrix: a row"));
    };
    const bool tr = static_cast<In*>(ins[0])->trans;
    for (int l = 0; l < 32; ++l)
      if (static_cast<In*>(ins[l])->trans != tr) fail("ldmatrix: lanes disagree on .trans");
    for (int l = 0; l < 32; ++l) {
      auto* o = static_cast<uint32_t*>(outs[l]);
      for (int j = 0; j < 4; ++j) {
        uint16_t lo, hi;
        if (!tr) {  // row l/4 of matrix j, columns 2(l%4), +1
          const uint16_t* p = row(8 * j + l / 4);
          lo = p[2 * (l % 4)];
          hi = p[2 * (l % 4) + 1];
        } else {  // the transpose: rows 2(l%4), +1 of matrix j at column l/4
          lo = row(8 * j + 2 * (l % 4))[l / 4];
          hi = row(8 * j + 2 * (l % 4) + 1)[l / 4];
        }
        o[j] = uint32_t(lo) | uint32_t(hi) << 16;
      }
    }
  }, __builtin_return_address(0));
}

void stmatrix_x4_trans(uint32_t addr, const uint32_t (&r)[4]) {
  struct In {
    uint32_t addr;
    uint32_t r[4];
  } in{addr, {r[0], r[1], r[2], r[3]}};
  int dummy = 0;
  warp_collective(0xffffffffu, &in, &dummy, [](void* const* ins, void* const*, unsigned) {
    auto row = [&](int lane) {  // the 8 halves of the destination row lane `lane` addresses
      return reinterpret_cast<uint16_t*>(shared_row16(static_cast<In*>(ins[lane])->addr, "stmatrix: a row"));
    };
    for (int l = 0; l < 32; ++l) {  // lane l holds (row l/4, columns 2(l%4), +1) of each matrix j
      const In& x = *static_cast<In*>(ins[l]);
      for (int j = 0; j < 4; ++j) {  // transposed: to rows 2(l%4), +1 at column l/4
        row(8 * j + 2 * (l % 4))[l / 4] = uint16_t(x.r[j] & 0xFFFF);
        row(8 * j + 2 * (l % 4) + 1)[l / 4] = uint16_t(x.r[j] >> 16);
      }
    }
  }, __builtin_return_address(0));
}

void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  struct In {
    uint32_t a[4], b[2];
    float c[4];
    bool bf16;
  } in{{a[0], a[1], a[2], a[3]}, {b0, b1}, {c[0], c[1], c[2], c[3]}, bf16};
  warp_collective(0xffffffffu, &in, c, [](void* const* ins, void* const* outs, unsigned) {
    float A[16][16], B[16][8], C[16][8];
    const bool bf = static_cast<In*>(ins[0])->bf16;
    auto lo = [&](uint32_t u) { return half_bits_to_float(uint16_t(u & 0xFFFF), bf); };
    auto hi = [&](uint32_t u) { return half_bits_to_float(uint16_t(u >> 16), bf); };
    for (int l = 0; l < 32; ++l) {
      const In& x = *static_cast<In*>(ins[l]);
      if (x.bf16 != bf) fail("mma: lanes disagree on the operand type");
      const int g = l / 4, t = l % 4;
      for (int q = 0; q < 4; ++q) {  // a0 (g, 2t) a1 (g+8, 2t) a2 (g, 2t+8) a3 (g+8, 2t+8)
        const int m = g + 8 * (q & 1), k = 2 * t + 8 * (q >> 1);
        A[m][k] = lo(x.a[q]);
        A[m][k + 1] = hi(x.a[q]);
      }
      for (int q = 0; q < 2; ++q) {  // b0 (k 2t, 2t+1; col g) b1 (k 2t+8, 2t+9; col g)
        B[2 * t + 8 * q][g] = lo(x.b[q]);
        B[2 * t + 8 * q + 1][g] = hi(x.b[q]);
      }
      for (int q = 0; q < 4; ++q) C[g + 8 * (q >> 1)][2 * t + (q & 1)] = x.c[q];
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      auto* o = static_cast<float*>(outs[l]);
      for (int q = 0; q < 4; ++q) {
        const int m = g + 8 * (q >> 1), n = 2 * t + (q & 1);
        double s = 0.0;  // products of 16-bit values are exact; the sum is rounded once
        for (int k = 0; k < 16; ++k) s += double(A[m][k]) * double(B[k][n]);
        o[q] = float(s + double(C[m][n]));
      }
    }
  }, __builtin_return_address(0));
}

// cp.async: the destination reads as 0xFF bytes from the issue until a wait completes the copy's group, so a read
// before the wait, or a refill of a buffer still being read, shows as NaN. The source is read at the issue.
void cp_async16(uint32_t dst, const void* src, bool pred) {
  if (pred && reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("cp.async: source not 16-byte aligned");
  unsigned char* d = shared_row16(dst, "cp.async: destination");
  PendingCopy copy{dst, {}};
  if (pred) std::memcpy(copy.data, src, 16);
  std::memset(d, 0xFF, 16);
  cur().copies.push_back(copy);
}

void cp_async_commit() {
  Fiber& f = cur();
  f.groups.push_back(f.copies.size());
}

void cp_async_wait(int newest_pending) {
  Fiber& f = cur();
  const int done_groups = int(f.groups.size()) - newest_pending;
  if (done_groups <= 0) return;
  const size_t done = f.groups[done_groups - 1];
  unsigned char* arena = f.cta->arena.get();
  for (size_t i = 0; i < done; ++i) std::memcpy(arena + f.copies[i].dst, f.copies[i].data, 16);
  f.copies.erase(f.copies.begin(), f.copies.begin() + done);
  f.groups.erase(f.groups.begin(), f.groups.begin() + done_groups);
  for (size_t& g : f.groups) g -= done;
}

}  // namespace emu

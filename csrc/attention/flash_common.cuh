// Warp-level building blocks shared by the attention kernels (FlashAttention-2 style, runs on sm_80+ incl. sm_90a):
// 16-byte cp.async tile loads into XOR-swizzled shared memory, ldmatrix fragment loads, and the
// mma.sync.m16n8k16 (fp32 accumulate) tensor-core instruction for bf16 and fp16.
//
// Fragment layouts (PTX ISA, "mma.m16n8k16", 16-bit A/B; lane = 4 * g + t):
//   A 16x16 (4 regs of 2 halves): a0 = (row g,   k 2t..2t+1), a1 = (row g+8, k 2t..2t+1),
//                                 a2 = (row g,   k 2t+8..9),  a3 = (row g+8, k 2t+8..9)
//   B 16x8  (2 regs):             b0 = (k 2t..2t+1, col g),   b1 = (k 2t+8..9, col g)
//   C 16x8  (4 floats):           c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, cols 2t, 2t+1)
// Two adjacent C tiles (16 x 16) therefore hold exactly an A fragment of the next GEMM: that is how P = softmax(S)
// feeds P V without leaving registers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace l3k::attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kInf = __builtin_huge_valf();

__host__ __device__ constexpr int cdiv(int a, int b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------------- element types
template <typename T>
struct Half;

template <>
struct Half<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low 16 bits) = lo
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t u) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u));
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef L3K_EMU
    emu::mma_m16n8k16(c, a, b0, b1, true);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
};

template <>
struct Half<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t u) { return __half22float2(*reinterpret_cast<__half2*>(&u)); }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef L3K_EMU
    emu::mma_m16n8k16(c, a, b0, b1, false);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
};

// ------------------------------------------------------------------------------------- shared memory
// Tiles are [rows][D] halves. 16-byte chunk c of row r lives at chunk c ^ (r % 8): the 8 rows that one
// ldmatrix phase reads (same logical chunk) then fall in 8 different 16-byte bank groups (no conflicts),
// for D = 64 (128-byte rows) and D = 128 (256-byte rows) alike. `col` must be a multiple of 8.
template <int D>
__device__ __forceinline__ int swz(int row, int col) {
  return row * D + ((((col >> 3) ^ (row & 7))) << 3);
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; when !pred nothing is read from `src` and the destination is zero-filled.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
#ifdef L3K_EMU
  emu::cp_async16(smem_u32(dst), src, pred);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(pred ? 16 : 0)
               : "memory");
#endif
}
#ifdef L3K_EMU
__device__ __forceinline__ void cp_async_commit() { emu::cp_async_commit(); }
__device__ __forceinline__ void cp_async_wait_all() { emu::cp_async_wait(0); }
#else
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
#endif
// Wait until at most N of this thread's most recent cp.async groups are still pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef L3K_EMU
  emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Copies ROWS rows of D halves into a swizzled tile; row_ptr(r) gives the source row or nullptr (zero row).
// `any` is a valid global address used as the (unread) source of zero-filled chunks.
template <int D, int ROWS, int THREADS, typename T, typename RowPtr>
__device__ __forceinline__ void load_tile(T* tile, RowPtr row_ptr, const T* any, int tid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
#pragma unroll
  for (int c = tid; c < ROWS * kChunks; c += THREADS) {
    const int r = c / kChunks, ch = c % kChunks;
    const T* src = row_ptr(r);
    cp_async16(tile + swz<D>(r, ch * 8), src ? src + ch * 8 : any, src != nullptr);
  }
}

// ------------------------------------------------------------------------------------- fragments
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
#ifdef L3K_EMU
  emu::ldmatrix_x4(r, addr, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
#ifdef L3K_EMU
  emu::ldmatrix_x4(r, addr, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// Stores four 8x8 matrices held as mma C-fragment pairs (lane = 4 g + t: row g, columns 2t, 2t+1, packed), each
// transposed: memory row i of matrix j (its address from lane 8j + i) receives the fragment's column i (sm_90
// stmatrix .trans).
__device__ __forceinline__ void stsm_x4_trans(uint32_t addr, const uint32_t (&r)[4]) {
#ifdef L3K_EMU
  emu::stmatrix_x4_trans(addr, r);
#else
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1,%2,%3,%4};\n" ::"r"(addr), "r"(r[0]),
               "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
#endif
}

// A fragment: rows m0..m0+15, k columns k0..k0+15 of a row-major [m][k] tile.
// Lanes 0-15 address rows 0-15 at k0, lanes 16-31 rows 0-15 at k0 + 8: matrices (r0-7,k0) (r8-15,k0)
// (r0-7,k0+8) (r8-15,k0+8) = a0 a1 a2 a3.
template <int D, typename T>
__device__ __forceinline__ void ldsm_a(uint32_t (&a)[4], const T* tile, int m0, int k0, int lane) {
  ldsm_x4(a, smem_u32(tile + swz<D>(m0 + (lane & 15), k0 + ((lane >> 4) << 3))));
}

// B fragments of two 8-column tiles (n0, n0 + 8) x k16 from a row-major [n][k] tile (B = tileᵀ, e.g. K in Q Kᵀ):
// b[0], b[1] for columns n0..n0+7 and b[2], b[3] for n0+8..n0+15.
template <int D, typename T>
__device__ __forceinline__ void ldsm_b_nk(uint32_t (&b)[4], const T* tile, int n0, int k0, int lane) {
  ldsm_x4(b, smem_u32(tile + swz<D>(n0 + (lane & 7) + ((lane >> 4) << 3), k0 + (((lane >> 3) & 1) << 3))));
}

// Same two B tiles from a row-major [k][n] tile (e.g. V in P V), via the transposing ldmatrix.
template <int D, typename T>
__device__ __forceinline__ void ldsm_b_kn(uint32_t (&b)[4], const T* tile, int k0, int n0, int lane) {
  ldsm_x4_trans(b, smem_u32(tile + swz<D>(k0 + (lane & 7) + (((lane >> 3) & 1) << 3), n0 + ((lane >> 4) << 3))));
}

// acc[mt][16 x 8*NT] += A_mt[16 x D] Bᵀ for MT stacked 16-row A tiles (rows a_row0 + 16·mt of sA) and B = rows
// 0..8*NT-1 of sB (both [*][D]). Every B fragment read from shared memory feeds MT tensor-core ops: with one
// 16-row tile a warp, ldmatrix traffic per mma bounds the kernel.
template <typename T, int D, int NT, int MT>
__device__ __forceinline__ void gemm_abt_rows(float (&acc)[MT][NT][4], const T* sA, int a_row0, const T* sB,
                                              int lane) {
  static_assert(NT % 2 == 0, "column tiles come in pairs");
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) ldsm_a<D>(a[mt], sA, a_row0 + 16 * mt, kk * 16, lane);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      ldsm_b_nk<D>(b, sB, np * 16, kk * 16, lane);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        Half<T>::mma(acc[mt][2 * np], a[mt], b[0], b[1]);
        Half<T>::mma(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// acc[mt][16 x D] += P_mt[16 x 8*KT] B with each P_mt given as KT C-tiles in registers (rounded to T here) and
// B = rows 0..8*KT-1 of the row-major [k][D] tile sB.
template <typename T, int D, int KT, int MT>
__device__ __forceinline__ void gemm_pb_rows(float (&acc)[MT][D / 8][4], const float (&p)[MT][KT][4], const T* sB,
                                             int lane) {
  static_assert(KT % 2 == 0, "contraction tiles come in pairs");
#pragma unroll
  for (int kk = 0; kk < KT / 2; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      a[mt][0] = Half<T>::pack(p[mt][2 * kk][0], p[mt][2 * kk][1]);
      a[mt][1] = Half<T>::pack(p[mt][2 * kk][2], p[mt][2 * kk][3]);
      a[mt][2] = Half<T>::pack(p[mt][2 * kk + 1][0], p[mt][2 * kk + 1][1]);
      a[mt][3] = Half<T>::pack(p[mt][2 * kk + 1][2], p[mt][2 * kk + 1][3]);
    }
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t b[4];
      ldsm_b_kn<D>(b, sB, kk * 16, dp * 16, lane);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        Half<T>::mma(acc[mt][2 * dp], a[mt], b[0], b[1]);
        Half<T>::mma(acc[mt][2 * dp + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// The single-tile forms (one 16-row A tile a warp), used by the backward kernels.
template <typename T, int D, int NT>
__device__ __forceinline__ void gemm_abt(float (&acc)[NT][4], const T* sA, int a_row0, const T* sB, int lane) {
  gemm_abt_rows<T, D, NT, 1>(reinterpret_cast<float(&)[1][NT][4]>(acc), sA, a_row0, sB, lane);
}

template <typename T, int D, int KT>
__device__ __forceinline__ void gemm_pb(float (&acc)[D / 8][4], const float (&p)[KT][4], const T* sB, int lane) {
  gemm_pb_rows<T, D, KT, 1>(reinterpret_cast<float(&)[1][D / 8][4]>(acc),
                            reinterpret_cast<const float(&)[1][KT][4]>(p), sB, lane);
}

// 2^x by the MUFU approximation (flush-to-zero; 2^-inf = 0), as --use_fast_math would compile exp2f: exp2f's
// denormal-safe sequence costs 3 more instructions and registers in a loop at the register limit.
__device__ __forceinline__ float exp2_approx(float x) {
#ifdef L3K_EMU
  return exp2f(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

// Reductions over the 4 lanes (t = 0..3) that share a fragment row.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

template <typename T>
__device__ __forceinline__ void store2(T* dst, float x, float y) {
  *reinterpret_cast<uint32_t*>(dst) = Half<T>::pack(x, y);
}

}  // namespace l3k::attn

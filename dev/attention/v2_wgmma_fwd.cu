// v2_wgmma_fwd.cu: v1 (dev/attention/README.md) with the softmax hidden behind the tensor cores, two ways:
// - within a warpgroup: step n issues S(n) = Q K(n)ᵀ and O += P(n+1) V(n+1) back to back, waits for S(n) only,
//   runs the softmax of S(n) while the PV wgmma is still in flight, then waits for it and rescales O;
// - between the two consumer warpgroups (ping-pong): named barriers make them take turns issuing their two wgmma,
//   so one warpgroup's softmax runs while the other's GEMMs occupy the tensor cores.
// Same shapes, layouts, check and timing as v1 (harness.cuh); not part of the llama3_kernels build.
//
//   make -C dev/attention && ./dev/attention/v2_wgmma_fwd            # check + time every shape
//   ./dev/attention/v2_wgmma_fwd --check-only --max-seqlen 1000      # no timing, short shapes (sanitizers)

#include "sm90_fwd.cuh"

static constexpr const char* kVersion = "v2_wgmma_fwd";

// Named barriers 1 and 2 (0 is __syncthreads): "consumer warpgroup w may issue its wgmma". 256 threads each: the
// 128 of the warpgroup that waits (bar.sync) and the 128 of the other one, which lets it go (bar.arrive).
constexpr int kSchedBarrier0 = 1;
constexpr int kSchedThreads = 256;

__device__ __forceinline__ void sched_wait(int consumer) {
  cutlass::arch::NamedBarrier::sync(kSchedThreads, kSchedBarrier0 + consumer);
}
__device__ __forceinline__ void sched_pass(int consumer) {
  cutlass::arch::NamedBarrier::arrive(kSchedThreads, kSchedBarrier0 + (consumer ^ 1));
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) flash_fwd_v2_kernel(__grid_constant__ FwdParams const params) {
  using Element = typename Cfg::Element;
  using SharedStorage = typename Cfg::SharedStorage;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kHeadDim = Cfg::kHeadDim;
  static_assert(Cfg::kConsumerWarpgroups == 2, "the ping-pong pairs two consumer warpgroups");

  extern __shared__ __align__(1024) char smem_raw[];
  SharedStorage& smem = *reinterpret_cast<SharedStorage*>(smem_raw);
  const TileCoord t = tile_coord<Cfg>(params);
  init_barriers<Cfg>(smem);
  __syncthreads();

  if (threadIdx.x / 128 == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Cfg::kProducerRegs>();
    if (threadIdx.x == 0) produce<Cfg>(params, smem, t);
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<Cfg::kConsumerRegs>();
  const int mma_tid = threadIdx.x - 128;
  const int consumer = mma_tid / 128;  // 0 or 1
  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Cfg::SmemLayoutQ{});  // (M, D)
  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Cfg::SmemLayoutK{});  // (N, D, stage)
  Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename Cfg::SmemLayoutV{});  // (D, N, stage)

  typename Cfg::TiledMmaQK tiled_mma_qk;
  typename Cfg::TiledMmaPV tiled_mma_pv;
  auto thr_mma_qk = tiled_mma_qk.get_thread_slice(mma_tid);
  auto thr_mma_pv = tiled_mma_pv.get_thread_slice(mma_tid);

  Tensor tSrQ = thr_mma_qk.partition_fragment_A(sQ);  // wgmma descriptors (1, MMA_M, k_block)
  Tensor tSrK = thr_mma_qk.partition_fragment_B(sK);  // (1, MMA_N, k_block, stage)
  Tensor tOrV = thr_mma_pv.partition_fragment_B(sV);  // (1, MMA_N, k_block, stage)

  Tensor tSrS = partition_fragment_C(tiled_mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});   // fp32 scores
  Tensor tOrO = partition_fragment_C(tiled_mma_pv, Shape<Int<kBlockM>, Int<kHeadDim>>{});  // fp32 output
  // P (bf16) has its own registers: it is the A operand of a PV wgmma still in flight while S(n) is overwritten.
  Tensor tOrP = make_tensor<Element>(partition_shape_A(tiled_mma_pv, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  static_assert(size(decltype(tOrP){}) == size(decltype(tSrS){}), "P is S element for element");

  Tensor tScS = thr_mma_qk.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tOcO = thr_mma_pv.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor scores = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));  // (2 rows, 32 cols) per thread
  Tensor score_coords = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
  Tensor out = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));     // (2 rows, 32 cols) per thread
  Tensor out_coords = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));
  constexpr int kRows = size<0>(decltype(scores){});
  static_assert(kRows == 2, "each thread owns two accumulator rows");

  float row_max[kRows], row_sum[kRows], correction[kRows];
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }
  clear(tOrO);

  const int row0 = t.m_block * kBlockM;
  const int n_last = t.n_block_max - 1;  // the diagonal tile, processed first
  // Both warpgroups run n_last turns through the scheduler barriers (one per step below). Consumer 1 opens
  // consumer 0's first turn and skips its own last pass, so every barrier's arrivals match its waits exactly.
  if (consumer == 1 && n_last > 0) sched_pass(consumer);

  RingPos<Cfg::kStages> k_pos, v_pos;  // V lags K by one tile
  cutlass::arch::ClusterBarrier::wait(&smem.q_full, 0);

  // First (diagonal) tile: S, mask, softmax; its PV is issued by the next step (or the tail).
  cutlass::arch::ClusterBarrier::wait(&smem.k_full[k_pos.stage], k_pos.phase);
  wgmma_gemm<true>(tiled_mma_qk, tSrQ, tSrK(_, _, _, k_pos.stage), tSrS);
  wgmma_wait<0>(tSrS);
  release_slot(&smem.k_empty[k_pos.stage]);
  k_pos.advance();
  mask_scores<Cfg>(scores, score_coords, row0, n_last, params.seqlen);
  online_softmax(scores, row_max, row_sum, correction, params.scale_log2);  // O is zero: no rescale
  convert_p(tSrS, tOrP);

  for (int n_block = n_last - 1; n_block >= 0; --n_block) {
    cutlass::arch::ClusterBarrier::wait(&smem.k_full[k_pos.stage], k_pos.phase);
    cutlass::arch::ClusterBarrier::wait(&smem.v_full[v_pos.stage], v_pos.phase);
    sched_wait(consumer);
    wgmma_gemm<true>(tiled_mma_qk, tSrQ, tSrK(_, _, _, k_pos.stage), tSrS);      // S(n) = Q K(n)ᵀ
    wgmma_gemm<false>(tiled_mma_pv, tOrP, tOrV(_, _, _, v_pos.stage), tOrO);     // O += P(n+1) V(n+1)
    if (consumer == 0 || n_block > 0) sched_pass(consumer);
    wgmma_wait<1>(tSrS);  // S(n) done; the PV batch may still run
    release_slot(&smem.k_empty[k_pos.stage]);
    k_pos.advance();

    mask_scores<Cfg>(scores, score_coords, row0, n_block, params.seqlen);
    online_softmax(scores, row_max, row_sum, correction, params.scale_log2);

    wgmma_wait<0>(tOrO, tOrP);  // PV done: O and P may be touched again
    release_slot(&smem.v_empty[v_pos.stage]);
    v_pos.advance();
    rescale_rows(out, correction);  // O holds P(n+1) V(n+1) at the old max
    convert_p(tSrS, tOrP);
  }

  // Tail: the last tile's PV.
  cutlass::arch::ClusterBarrier::wait(&smem.v_full[v_pos.stage], v_pos.phase);
  wgmma_gemm<false>(tiled_mma_pv, tOrP, tOrV(_, _, _, v_pos.stage), tOrO);
  wgmma_wait<0>(tOrO, tOrP);
  release_slot(&smem.v_empty[v_pos.stage]);
  store_output<Cfg>(params, t, out, out_coords, row_max, row_sum);
}

// What harness.cuh runs.
using Cfg = FwdConfig;
static void (*const kKernel)(FwdParams) = flash_fwd_v2_kernel<Cfg>;

#include "harness.cuh"

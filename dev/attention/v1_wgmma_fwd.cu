// v1_wgmma_fwd.cu: causal GQA flash-attention forward for Hopper (sm_90a), head dim 64 or 128, bf16, as a standalone
// program: one kernel (TMA producer warp + two wgmma consumer warpgroups), a naive fp32 reference on sampled rows,
// and a timing loop. Scratch code for the ladder in dev/attention/README.md; not part of the llama3_kernels build.
// v1: each consumer warpgroup runs S = QKᵀ, waits, softmax, O += PV, waits: no overlap of softmax with wgmma.
//
//   make -C dev/attention && ./dev/attention/v1_wgmma_fwd            # check + time every shape
//   ./dev/attention/v1_wgmma_fwd --check-only --max-seqlen 1000      # no timing, short shapes (sanitizers)
//   ./dev/attention/v1_wgmma_fwd --layout-check                      # host-only register-layout self-test

#include "../../csrc/attention/flash_fwd_sm90.cuh"

using namespace l3k::sm90;

static constexpr const char* kVersion = "v1_wgmma_fwd";

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) flash_fwd_v1_kernel(__grid_constant__ FwdParams<Cfg> const params) {
  using Element = typename Cfg::Element;
  using SharedStorage = typename Cfg::SharedStorage;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kHeadDim = Cfg::kHeadDim;

  extern __shared__ __align__(1024) char smem_raw[];
  SharedStorage& smem = *reinterpret_cast<SharedStorage*>(smem_raw);
  const TileCoord t = tile_coord<Cfg>(params);
  if (t.empty()) return;  // uniform over the CTA, before any barrier
  init_barriers<Cfg>(smem);
  __syncthreads();

  if (threadIdx.x / 128 == 0) {
    // producer: one thread issues every TMA load; the rest of the warpgroup idles
    cutlass::arch::warpgroup_reg_dealloc<Cfg::kProducerRegs>();
    if (threadIdx.x == 0) produce<Cfg>(params, smem, t);
    return;
  }

  // consumers: warpgroups 1 and 2, rows 0..63 and 64..127 of the tile
  cutlass::arch::warpgroup_reg_alloc<Cfg::kConsumerRegs>();
  const int mma_tid = threadIdx.x - 128;
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
  // P as the register A operand of the PV wgmma: ((2, 2, 2), MMA_M, k_block). Its flat order equals the flat order
  // of the S accumulator ((2, 2, N/8), 1, 1): both step column+1, row+8, column+8, so conversion is element-wise.
  Tensor tOrP = make_tensor<Element>(partition_shape_A(tiled_mma_pv, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  static_assert(size(decltype(tOrP){}) == size(decltype(tSrS){}), "P must reuse the S accumulator's registers 1:1");

  // Tile coordinates (row, col) of each accumulator element, for masks and stores.
  Tensor tScS = thr_mma_qk.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tOcO = thr_mma_pv.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor scores = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));  // (2 rows, 32 cols) per thread
  Tensor score_coords = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
  Tensor out = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));     // (2 rows, D / 4 cols) per thread
  Tensor out_coords = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));
  constexpr int kRows = size<0>(decltype(scores){});
  static_assert(kRows == 2, "each thread owns two accumulator rows");

  float row_max[kRows], row_sum[kRows], correction[kRows];
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY;  // running max of raw scores (unscaled)
    row_sum[r] = 0.f;        // running sum of exp2, partial over this thread's columns until the epilogue
  }
  clear(tOrO);

  const int row0 = t.row0;
  cutlass::arch::ClusterBarrier::wait(&smem.q_full, 0);

  RingPos<Cfg::kStages> pos;  // K and V advance together
  for (int n_block = t.n_block_max - 1; n_block >= 0; --n_block) {
    // S = Q Kᵀ
    cutlass::arch::ClusterBarrier::wait(&smem.k_full[pos.stage], pos.phase);
    wgmma_gemm<true>(tiled_mma_qk, tSrQ, tSrK(_, _, _, pos.stage), tSrS);
    wgmma_wait<0>(tSrS);
    release_slot(&smem.k_empty[pos.stage]);

    mask_scores<Cfg>(scores, score_coords, row0, n_block, t.seqlen);
    online_softmax(scores, row_max, row_sum, correction, params.scale_log2);
    rescale_rows(out, correction);
    convert_p(tSrS, tOrP);

    // O += P V
    cutlass::arch::ClusterBarrier::wait(&smem.v_full[pos.stage], pos.phase);
    wgmma_gemm<false>(tiled_mma_pv, tOrP, tOrV(_, _, _, pos.stage), tOrO);
    wgmma_wait<0>(tOrO, tOrP);
    release_slot(&smem.v_empty[pos.stage]);
    pos.advance();
  }
  store_output<Cfg>(params, t, out, out_coords, row_max, row_sum);
}

// What harness.cuh runs, for each head dim's configuration.
template <class Cfg>
static void (*const kKernel)(FwdParams<Cfg>) = flash_fwd_v1_kernel<Cfg>;

#include "harness.cuh"

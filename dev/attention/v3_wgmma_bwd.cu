// v3_wgmma_bwd.cu: the ladder's backward rung, which is the extension's opt-in Hopper backward
// (csrc/attention/flash_bwd_sm90.cuh: a dsum pre-pass, a dq kernel and a dk/dv kernel, TMA + wgmma, deterministic;
// design in dev/attention/README.md), run here under a standalone check (a naive fp32 reference on sampled rows)
// and timing.
//
//   make -C dev/attention v3_wgmma_bwd && ./dev/attention/v3_wgmma_bwd     # check + time every shape
//   ./dev/attention/v3_wgmma_bwd --check-only --max-seqlen 1000           # short shapes (sanitizers)
//   ./dev/attention/v3_wgmma_bwd --head-dim 64                            # one head dim (default: 128, then 64)
//   ./dev/attention/v3_wgmma_bwd --layout-check                           # host-only layout self-test

#include "../../csrc/attention/flash_bwd_sm90.cuh"

#include <cstring>
#include <vector>

#include "common.cuh"

using namespace l3k::sm90;

static constexpr const char* kVersion = "v3_wgmma_bwd";

// ------------------------------------------------------------------------------------------------------------------
// Check
// ------------------------------------------------------------------------------------------------------------------

// Naive forward for every row: o (bf16, as the real forward stores it) and lse (fp32). One block per (b, h, i).
__global__ void forward_rows_kernel(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                                    __nv_bfloat16* o, float* lse, int seqlen, int heads_q, int heads_kv, int D,
                                    float scale) {
  const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  extern __shared__ float p_s[];  // [seqlen]
  __nv_bfloat16* o_row = o + ((int64_t(b) * seqlen + i) * heads_q + h) * D;
  const float l = naive_attention_row(q, k, v, b, h, i, seqlen, heads_q, heads_kv, D, scale, p_s,
                                      [&](int d, float x) { o_row[d] = __float2bfloat16(x); });
  if (threadIdx.x == 0) lse[(int64_t(b) * heads_q + h) * seqlen + i] = l;
}

// Reference gradients in fp32 for sampled rows, from the same bf16 inputs, o and lse the kernels use (dsum recomputed
// here from o and do, independently of dsum_kernel):
// item.w = 0: dq of query row (b, h, i); item.w = 1: dk and dv of key row (b, hkv, j) (summed over the group).
__global__ void reference_grads_kernel(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                                       const __nv_bfloat16* o, const __nv_bfloat16* dout, const float* lse,
                                       const int4* items, float* ref, int seqlen, int heads_q, int heads_kv,
                                       int D, float scale) {
  const int4 it = items[blockIdx.x];
  const int b = it.x, head = it.y, row = it.z;
  const int group = heads_q / heads_kv;
  const int d = threadIdx.x;  // blockDim.x == D: one output column per thread
  auto at_q = [&](int i, int h) { return ((int64_t(b) * seqlen + i) * heads_q + h) * D; };
  auto at_k = [&](int j, int hk) { return ((int64_t(b) * seqlen + j) * heads_kv + hk) * D; };
  __shared__ float red[4];
  auto block_dot = [&](float x) {  // sum over the D threads (2 or 4 warps)
    for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
    __syncthreads();
    if (d % 32 == 0) red[d / 32] = x;
    __syncthreads();
    float sum = 0.f;
    for (int w = 0; w < D / 32; ++w) sum += red[w];
    return sum;
  };
  if (it.w == 0) {  // dq_i = scale Σ_j dS_ij k_j
    const int h = head, hk = h / group, i = row;
    const float qd = __bfloat162float(q[at_q(i, h) + d]), dod = __bfloat162float(dout[at_q(i, h) + d]);
    const float l = lse[(int64_t(b) * heads_q + h) * seqlen + i];
    const float ds = block_dot(dod * __bfloat162float(o[at_q(i, h) + d]));
    float acc = 0.f;
    for (int j = 0; j <= i; ++j) {
      const float kd = __bfloat162float(k[at_k(j, hk) + d]), vd = __bfloat162float(v[at_k(j, hk) + d]);
      const float sdot = block_dot(qd * kd), dpdot = block_dot(dod * vd);
      const float pij = expf(sdot * scale - l);
      acc += pij * (dpdot - ds) * kd;
    }
    ref[int64_t(blockIdx.x) * 2 * D + d] = acc * scale;
  } else {  // dk_j = scale Σ_{h in group, i >= j} dS_ij q_i; dv_j = Σ P_ij do_i
    const int hk = head, j = row;
    const float kd = __bfloat162float(k[at_k(j, hk) + d]), vd = __bfloat162float(v[at_k(j, hk) + d]);
    float acc_k = 0.f, acc_v = 0.f;
    for (int h = hk * group; h < (hk + 1) * group; ++h) {
      for (int i = j; i < seqlen; ++i) {
        const float qd = __bfloat162float(q[at_q(i, h) + d]), dod = __bfloat162float(dout[at_q(i, h) + d]);
        const float sdot = block_dot(qd * kd), dpdot = block_dot(dod * vd);
        const float ds = block_dot(dod * __bfloat162float(o[at_q(i, h) + d]));
        const float pij = expf(sdot * scale - lse[(int64_t(b) * heads_q + h) * seqlen + i]);
        acc_v += pij * dod;
        acc_k += pij * (dpdot - ds) * qd;
      }
    }
    ref[int64_t(blockIdx.x) * 2 * D + d] = acc_k * scale;
    ref[int64_t(blockIdx.x) * 2 * D + D + d] = acc_v;
  }
}

// Per sampled row: |got - ref| <= 0.02 max|ref row| + 0.02 |ref|. P and dS are rounded to bf16 before the wgmma
// (as every flash backward does), and the outputs are bf16; an error of a few percent of the row's largest value is
// what that costs (FlashAttention's own tests compare against twice a bf16 reference's error), while a dropped key
// or query tile, a missing head of the group, or a wrong mask moves a row by a good part of its magnitude.
static bool check_grads(int B, int S, int Hq, int Hkv, int D, const __nv_bfloat16* q, const __nv_bfloat16* k,
                        const __nv_bfloat16* v, const __nv_bfloat16* o, const __nv_bfloat16* dout, const float* lse,
                        const __nv_bfloat16* dq, const __nv_bfloat16* dk, const __nv_bfloat16* dv, float scale) {
  std::vector<int4> items;
  const int edge_rows[] = {0, 1, 63, 64, 127, 128, 129, S / 2, S - 129, S - 65, S - 64, S - 2, S - 1};
  for (int bb : {0, B - 1})
    for (int i : edge_rows) {
      if (i < 0 || i >= S) continue;
      for (int h : {0, 5, Hq - 1}) items.push_back(make_int4(bb, h, i, 0));
      for (int hk : {0, Hkv - 1}) items.push_back(make_int4(bb, hk, i, 1));
    }
  uint64_t state = 0x5eed + S;
  for (int n = 0; n < 64; ++n) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    const uint32_t x = uint32_t(state >> 33);
    const int kind = n % 2;
    items.push_back(make_int4(int(x % B), int((x / B) % (kind ? Hkv : Hq)), int((state >> 7) % S), kind));
  }
  const int n_items = int(items.size());
  int4* d_items;
  float* d_ref;
  unsigned long long* d_bad;
  CUDA_CHECK(cudaMalloc(&d_items, n_items * sizeof(int4)));
  CUDA_CHECK(cudaMalloc(&d_ref, int64_t(n_items) * 2 * D * sizeof(float)));
  CUDA_CHECK(cudaMalloc(&d_bad, sizeof(unsigned long long)));
  CUDA_CHECK(cudaMemcpy(d_items, items.data(), n_items * sizeof(int4), cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemset(d_bad, 0, sizeof(unsigned long long)));
  reference_grads_kernel<<<n_items, D>>>(q, k, v, o, dout, lse, d_items, d_ref, S, Hq, Hkv, D, scale);
  count_nonfinite_kernel<<<1024, 256>>>(dq, int64_t(B) * S * Hq * D, d_bad);
  count_nonfinite_kernel<<<1024, 256>>>(dk, int64_t(B) * S * Hkv * D, d_bad);
  count_nonfinite_kernel<<<1024, 256>>>(dv, int64_t(B) * S * Hkv * D, d_bad);
  CUDA_CHECK(cudaGetLastError());
  CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> ref(size_t(n_items) * 2 * D);
  unsigned long long nonfinite = 0;
  CUDA_CHECK(cudaMemcpy(ref.data(), d_ref, ref.size() * sizeof(float), cudaMemcpyDeviceToHost));
  CUDA_CHECK(cudaMemcpy(&nonfinite, d_bad, sizeof(nonfinite), cudaMemcpyDeviceToHost));

  double worst = 0.0;
  int bad = 0;
  std::vector<__nv_bfloat16> row(D);
  for (int n = 0; n < n_items; ++n) {
    const int4 it = items[n];
    for (int which = 0; which < (it.w == 0 ? 1 : 2); ++which) {
      const __nv_bfloat16* src = it.w == 0 ? dq + ((int64_t(it.x) * S + it.z) * Hq + it.y) * D
                                           : (which == 0 ? dk : dv) + ((int64_t(it.x) * S + it.z) * Hkv + it.y) * D;
      CUDA_CHECK(cudaMemcpy(row.data(), src, D * sizeof(__nv_bfloat16), cudaMemcpyDeviceToHost));
      const float* r = ref.data() + size_t(n) * 2 * D + which * D;
      double row_max = 0.0;
      for (int d = 0; d < D; ++d) row_max = std::max(row_max, double(std::fabs(r[d])));
      bool row_bad = false;
      for (int d = 0; d < D; ++d) {
        const double err = std::fabs(double(__bfloat162float(row[d])) - r[d]);
        // the floor: a row whose reference is exactly 0 (dq of row 0: dP = dsum) still has fp32 rounding
        const double tol = 0.02 * row_max + 0.02 * std::fabs(r[d]) + 1e-4;
        worst = std::max(worst, std::isnan(err) ? INFINITY : err / tol);
        if (!(err <= tol)) row_bad = true;
      }
      if (row_bad && bad++ < 6) {
        const char* name = it.w == 0 ? "dq" : (which == 0 ? "dk" : "dv");
        std::printf("    %s mismatch at b=%d head=%d row=%d: [0]=%g ref %g (row max %g)\n", name, it.x, it.y, it.z,
                    __bfloat162float(row[0]), r[0], row_max);
      }
    }
  }
  const bool ok = bad == 0 && nonfinite == 0;
  std::printf("  check B=%d S=%d: %d sampled rows, worst error %.2f of tolerance, non-finite=%llu, %s\n", B, S, n_items,
              worst, nonfinite, ok ? "PASS" : "FAIL");
  CUDA_CHECK(cudaFree(d_items));
  CUDA_CHECK(cudaFree(d_ref));
  CUDA_CHECK(cudaFree(d_bad));
  return ok;
}

// The assumptions the kernels rest on, checked on the host: (1) the K-major (rows, D) and MN-major (D, rows) views
// of a small tile address every element identically (TMA writes one, the transposed operands read the other);
// (2) the fp32 S/dP accumulator and the RS wgmma's A fragment hold the same (row, col) at each flat index, so
// P and dS convert element by element.
template <class Cfg>
static bool layout_selftest() {
  int errors = 0;
  auto fail = [&](const char* what, int a, int b) {
    if (errors++ < 10) std::printf("layout self-test: %s (%d, %d)\n", what, a, b);
  };
  typename Cfg::SmemSmall kmaj;
  typename Cfg::SmemSmallT mnmaj;
  for (int st = 0; st < Cfg::kStages; ++st)
    for (int r = 0; r < Cfg::kSmall; ++r)
      for (int d = 0; d < Cfg::kHeadDim; ++d)
        if (kmaj(r, d, st) != mnmaj(d, r, st)) fail("K-major and MN-major views differ", r, d);
  typename Cfg::TiledMmaS mma_s;
  typename Cfg::TiledMmaAcc mma_acc;
  using Tile = Shape<typename Cfg::Big, typename Cfg::Small>;
  for (int t = 0; t < 256; ++t) {
    auto c = mma_s.get_thread_slice(t).partition_C(make_identity_tensor(Tile{}));
    auto a = mma_acc.get_thread_slice(t).partition_A(make_identity_tensor(Tile{}));
    auto a_shape = partition_shape_A(mma_acc, Tile{});
    if (size(c) != size(a) || size(a_shape) != size(c)) fail("accumulator and A fragment sizes differ", t, 0);
    auto compact = make_layout(a_shape);
    for (int i = 0; i < size(c); ++i) {
      if (c(i) != a(idx2crd(i, a_shape)) || compact(idx2crd(i, a_shape)) != i) fail("A order != C order", t, i);
    }
    auto rc = make_tensor(c.data(), acc_rowcol(c.layout()));
    if (size<0>(rc) != 2) fail("expected 2 rows per thread", t, 0);
    for (int r = 0; r < 2; ++r)
      for (int col = 0; col < size<1>(rc); ++col)
        if (get<0>(rc(r, col)) != get<0>(rc(r, 0))) fail("row view mixes rows", t, col);
    for (int col = 0; col < size<1>(rc); ++col)
      if (get<1>(rc(0, col)) != get<1>(rc(1, col))) fail("columns differ between a thread's two rows", t, col);
  }
  std::printf("layout self-test D=%d: %s\n", Cfg::kHeadDim, errors == 0 ? "PASS" : "FAIL");
  return errors == 0;
}

static bool layout_selftests() { return layout_selftest<BwdConfig<128>>() & layout_selftest<BwdConfig<64>>(); }

// Every shape at head dim D: checked (where the naive reference stays in seconds), then (S >= 1024, unless
// --check-only) timed. False on a failed check; exits on a hang.
template <int D>
static bool run_head_dim(Options const& opt) {
  using Cfg = BwdConfig<D>;
  using FwdCfg = FwdConfig<D>;
  CUDA_CHECK(prepare_bwd<Cfg>());
  constexpr int Hq = 32, Hkv = 8;
  const float scale = 1.f / std::sqrt(float(D));
  struct Shape2 {
    int batch, seqlen;
  };
  // Checked shapes (B·S² <= 2^25: the naive forward is O(B·S²) per head), then the larger timing shapes.
  const Shape2 shapes[] = {{1, 1}, {2, 17}, {1, 129}, {2, 1000}, {1, 4097}, {16, 1024}, {4, 4096}, {1, 16384}};
  bool all_ok = true;
  for (Shape2 sh : shapes) {
    const int B = sh.batch, S = sh.seqlen;
    if (S > opt.max_seqlen) continue;
    const bool check = double(B) * S * S <= double(1 << 25);  // the naive forward and reference stay in seconds
    const int64_t nq = int64_t(B) * S * Hq * D, nk = int64_t(B) * S * Hkv * D, nst = int64_t(B) * Hq * S;
    __nv_bfloat16 *q, *k, *v, *o, *dout, *dq, *dk, *dv;
    float *lse, *dsum;
    for (auto* pp : {&q, &o, &dout, &dq}) CUDA_CHECK(cudaMalloc(pp, nq * sizeof(__nv_bfloat16)));
    for (auto* pp : {&k, &v, &dk, &dv}) CUDA_CHECK(cudaMalloc(pp, nk * sizeof(__nv_bfloat16)));
    CUDA_CHECK(cudaMalloc(&lse, nst * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&dsum, nst * sizeof(float)));
    fill_normal_kernel<<<1024, 256>>>(q, nq, 11 + S);
    fill_normal_kernel<<<1024, 256>>>(k, nk, 12 + S);
    fill_normal_kernel<<<1024, 256>>>(v, nk, 13 + S);
    fill_normal_kernel<<<1024, 256>>>(dout, nq, 14 + S);
    if (check) {  // exact forward statistics for every row
      const size_t shm = size_t(S) * sizeof(float);
      if (shm > 48 * 1024)
        CUDA_CHECK(cudaFuncSetAttribute(forward_rows_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shm)));
      forward_rows_kernel<<<dim3(S, Hq, B), 256, shm>>>(q, k, v, o, lse, S, Hq, Hkv, D, scale);
    } else {  // timing only: the extension's forward supplies o and lse
      const FwdParams<FwdCfg> fp = make_fwd_params<FwdCfg>(
          reinterpret_cast<const cutlass::bfloat16_t*>(q), reinterpret_cast<const cutlass::bfloat16_t*>(k),
          reinterpret_cast<const cutlass::bfloat16_t*>(v), reinterpret_cast<cutlass::bfloat16_t*>(o), lse, nullptr,
          B, S, 0, Hq, Hkv, scale);
      CUDA_CHECK(prepare_fwd<FwdCfg>(flash_fwd_sm90_kernel<FwdCfg>));
      launch_fwd<FwdCfg>(flash_fwd_sm90_kernel<FwdCfg>, fp, nullptr);
    }
    CUDA_CHECK(cudaGetLastError());
    for (auto* t : {dq, dk, dv}) CUDA_CHECK(cudaMemset(t, 0xff, (t == dq ? nq : nk) * sizeof(__nv_bfloat16)));
    const BwdParams<Cfg> bp = make_bwd_params<Cfg>(
        reinterpret_cast<const cutlass::bfloat16_t*>(q), reinterpret_cast<const cutlass::bfloat16_t*>(k),
        reinterpret_cast<const cutlass::bfloat16_t*>(v), reinterpret_cast<const cutlass::bfloat16_t*>(dout), lse,
        dsum, reinterpret_cast<cutlass::bfloat16_t*>(dq), reinterpret_cast<cutlass::bfloat16_t*>(dk),
        reinterpret_cast<cutlass::bfloat16_t*>(dv), nullptr, B, S, 0, Hq, Hkv, scale);
    cudaEvent_t done;
    CUDA_CHECK(cudaEventCreate(&done));
    launch_bwd(bp, o, dout, dsum, nullptr);
    CUDA_CHECK(cudaGetLastError());
    CUDA_CHECK(cudaEventRecord(done));
    char what[64];
    std::snprintf(what, sizeof(what), "B=%d S=%d backward", B, S);
    if (!wait_or_hang(done, 20, what)) std::exit(1);
    CUDA_CHECK(cudaEventDestroy(done));
    std::printf("B=%d S=%d Hq=%d Hkv=%d D=%d causal backward\n", B, S, Hq, Hkv, D);
    if (check) all_ok &= check_grads(B, S, Hq, Hkv, D, q, k, v, o, dout, lse, dq, dk, dv, scale);
    if (!opt.check_only && S >= 1024) {
      constexpr int kWarmup = 3, kIters = 10;
      void* flush;
      CUDA_CHECK(cudaMalloc(&flush, size_t(256) << 20));
      cudaEvent_t start, stop;
      CUDA_CHECK(cudaEventCreate(&start));
      CUDA_CHECK(cudaEventCreate(&stop));
      for (int i = 0; i < kWarmup; ++i) launch_bwd(bp, o, dout, dsum, nullptr);
      std::vector<float> times;
      for (int i = 0; i < kIters; ++i) {
        CUDA_CHECK(cudaMemsetAsync(flush, i, size_t(256) << 20));
        CUDA_CHECK(cudaEventRecord(start));
        launch_bwd(bp, o, dout, dsum, nullptr);
        CUDA_CHECK(cudaEventRecord(stop));
        CUDA_CHECK(cudaEventSynchronize(stop));
        float ms;
        CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
        times.push_back(ms);
      }
      std::sort(times.begin(), times.end());
      const float ms = 0.5f * (times[kIters / 2 - 1] + times[kIters / 2]);
      const double flops = 2.5 * 4.0 * B * Hq * double(S) * S * D / 2;  // backward = 2.5x the causal forward
      std::printf("  time %.3f ms (dsum + dq + dk/dv), %.1f TFLOP/s\n", ms, flops / (ms * 1e-3) / 1e12);
      CUDA_CHECK(cudaEventDestroy(start));
      CUDA_CHECK(cudaEventDestroy(stop));
      CUDA_CHECK(cudaFree(flush));
    }
    for (auto* t : {q, k, v, o, dout, dq, dk, dv}) CUDA_CHECK(cudaFree(t));
    CUDA_CHECK(cudaFree(lse));
    CUDA_CHECK(cudaFree(dsum));
  }
  return all_ok;
}

int main(int argc, char** argv) {
  Options opt;
  if (const int rc = start(argc, argv, opt, layout_selftests); rc >= 0) return rc;
  if (!hopper_device(kVersion)) return 1;
  bool all_ok = true;
  if (opt.runs(128)) all_ok &= run_head_dim<128>(opt);
  if (opt.runs(64)) all_ok &= run_head_dim<64>(opt);
  std::printf("%s\n", all_ok ? "ALL PASS" : "SOME CHECKS FAILED");
  return all_ok ? 0 : 1;
}

// harness.cuh: the check, timing and main() of a dev/attention rung. Include it last from a version's .cu file, after
// defining on top of csrc/attention/flash_fwd_sm90.cuh: `kVersion` (a name for the log) and the variable template
// `kKernel<Cfg>` (the kernel for configuration FwdConfig<D>, launched through launch_fwd<Cfg>). Every step runs for
// head dims 128 and 64 (or the one --head-dim names).
#pragma once

#include <cstring>
#include <vector>

#include "common.cuh"


// ------------------------------------------------------------------------------------------------------------------
// Check: random inputs, naive fp32 reference on sampled rows, non-finite count over the whole output.
// ------------------------------------------------------------------------------------------------------------------


// One block per checked (batch, head, row): scores into a global scratch row, softmax, then O = P V in fp32.
__global__ void reference_rows_kernel(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                                      const int3* rows, float* scratch, float* o_ref, float* lse_ref, int seqlen,
                                      int heads_q, int heads_kv, int D, float scale) {
  const int3 item = rows[blockIdx.x];  // (batch, head, row)
  float* o_row = o_ref + int64_t(blockIdx.x) * D;
  const float lse = naive_attention_row(q, k, v, item.x, item.y, item.z, seqlen, heads_q, heads_kv, D, scale,
                                        scratch + int64_t(blockIdx.x) * seqlen, [&](int d, float x) { o_row[d] = x; });
  if (threadIdx.x == 0) lse_ref[blockIdx.x] = lse;
}


struct Shape4 {
  int batch, seqlen;
};

// Tolerances: O is bf16 (half an ulp is 2^-9 relative) and P is rounded to bf16 before PV. A numpy simulation of a
// correct kernel (bf16 inputs, P and O) used at most 0.3 of |o - ref| <= 2e-3 + 2e-2 |ref|; long rows have |o| ~ 0.02,
// so a larger atol would let a dropped key pass there. lse is fp32 throughout (only exp2/log approximations differ,
// ~1e-6); dropping one key moves it by ~1e-3 even at row 4096.
constexpr float kAtol = 3e-3f, kRtol = 2e-2f, kLseTol = 5e-4f;

static bool check_shape(Shape4 shape, int heads_q, int heads_kv, int D, const __nv_bfloat16* q,
                        const __nv_bfloat16* k, const __nv_bfloat16* v, const __nv_bfloat16* o, const float* lse,
                        float scale) {
  const int B = shape.batch, S = shape.seqlen;
  // Sampled rows: edges of tiles and the tail in heads covering every KV group (Hkv = 8 of 4 query heads), plus
  // random rows.
  std::vector<int3> rows;
  const int edge_rows[] = {0, 1, 63, 64, 127, 128, 129, S / 2, S - 129, S - 128, S - 2, S - 1};
  const int edge_heads[] = {0, 3, 4, 8, 12, 16, 17, 20, 24, 28, heads_q - 1};
  for (int b : {0, B - 1})
    for (int h : edge_heads)
      for (int i : edge_rows)
        if (i >= 0 && i < S) rows.push_back(make_int3(b, h, i));
  uint64_t state = 0x1234567ULL + S;
  for (int n = 0; n < 256; ++n) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    const uint32_t x = uint32_t(state >> 33);
    rows.push_back(make_int3(int(x % B), int((x / B) % heads_q), int((state >> 7) % S)));
  }
  const int n_rows = int(rows.size());

  int3* d_rows;
  float *d_scratch, *d_o_ref, *d_lse_ref;
  unsigned long long* d_nonfinite;
  CUDA_CHECK(cudaMalloc(&d_rows, n_rows * sizeof(int3)));
  CUDA_CHECK(cudaMalloc(&d_scratch, int64_t(n_rows) * S * sizeof(float)));
  CUDA_CHECK(cudaMalloc(&d_o_ref, int64_t(n_rows) * D * sizeof(float)));
  CUDA_CHECK(cudaMalloc(&d_lse_ref, n_rows * sizeof(float)));
  CUDA_CHECK(cudaMalloc(&d_nonfinite, sizeof(unsigned long long)));
  CUDA_CHECK(cudaMemcpy(d_rows, rows.data(), n_rows * sizeof(int3), cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemset(d_nonfinite, 0, sizeof(unsigned long long)));
  reference_rows_kernel<<<n_rows, 256>>>(q, k, v, d_rows, d_scratch, d_o_ref, d_lse_ref, S, heads_q, heads_kv, D,
                                         scale);
  count_nonfinite_kernel<<<1024, 256>>>(o, int64_t(B) * S * heads_q * D, d_nonfinite);
  count_nonfinite_kernel<<<1024, 256>>>(lse, int64_t(B) * heads_q * S, d_nonfinite);  // every row has a key
  CUDA_CHECK(cudaGetLastError());
  CUDA_CHECK(cudaDeviceSynchronize());

  std::vector<float> o_ref(size_t(n_rows) * D), lse_ref(n_rows);
  std::vector<__nv_bfloat16> o_row(D);
  unsigned long long nonfinite = 0;
  CUDA_CHECK(cudaMemcpy(o_ref.data(), d_o_ref, o_ref.size() * sizeof(float), cudaMemcpyDeviceToHost));
  CUDA_CHECK(cudaMemcpy(lse_ref.data(), d_lse_ref, n_rows * sizeof(float), cudaMemcpyDeviceToHost));
  CUDA_CHECK(cudaMemcpy(&nonfinite, d_nonfinite, sizeof(nonfinite), cudaMemcpyDeviceToHost));

  double max_err = 0.0, max_ratio = 0.0, max_lse_err = 0.0;
  int bad = 0;
  for (int r = 0; r < n_rows; ++r) {
    const int b = rows[r].x, h = rows[r].y, i = rows[r].z;
    CUDA_CHECK(cudaMemcpy(o_row.data(), o + ((int64_t(b) * S + i) * heads_q + h) * D, D * sizeof(__nv_bfloat16),
                          cudaMemcpyDeviceToHost));
    float lse_got;
    CUDA_CHECK(cudaMemcpy(&lse_got, lse + (int64_t(b) * heads_q + h) * S + i, sizeof(float), cudaMemcpyDeviceToHost));
    bool row_bad = false;
    for (int d = 0; d < D; ++d) {
      const float ref = o_ref[size_t(r) * D + d], got = __bfloat162float(o_row[d]);
      const double err = std::fabs(double(got) - ref);  // NaN compares false below and is caught by !(err <= ...)
      max_err = std::max(max_err, std::isnan(err) ? INFINITY : err);
      const double ratio = err / (kAtol + kRtol * std::fabs(ref));
      max_ratio = std::max(max_ratio, std::isnan(ratio) ? INFINITY : ratio);
      if (!(err <= kAtol + kRtol * std::fabs(ref))) row_bad = true;
    }
    const double lse_err = std::fabs(double(lse_got) - lse_ref[r]);
    max_lse_err = std::max(max_lse_err, std::isnan(lse_err) ? INFINITY : lse_err);
    if (!(lse_err <= kLseTol)) row_bad = true;
    if (row_bad && bad++ < 5) {
      std::printf("    mismatch at b=%d h=%d row=%d: o[0]=%g ref %g, lse=%g ref %g\n", b, h, i,
                  __bfloat162float(o_row[0]), o_ref[size_t(r) * D], lse_got, lse_ref[r]);
    }
  }
  const bool ok = bad == 0 && nonfinite == 0;
  std::printf("  check B=%d S=%d: %d rows, max|o-ref|=%.3e (%.2f of tol), max|lse-ref|=%.3e, non-finite=%llu, %s\n", B,
              S, n_rows, max_err, max_ratio, max_lse_err, nonfinite, ok ? "PASS" : "FAIL");
  CUDA_CHECK(cudaFree(d_rows));
  CUDA_CHECK(cudaFree(d_scratch));
  CUDA_CHECK(cudaFree(d_o_ref));
  CUDA_CHECK(cudaFree(d_lse_ref));
  CUDA_CHECK(cudaFree(d_nonfinite));
  return ok;
}

// Median kernel time over 20 runs, each after a 256 MiB memset that evicts L2 (50 MiB on H100).
// Only the kernel launch sits between the events: the TMA descriptors are built once, before.
template <class Cfg>
static float time_ms(FwdParams<Cfg> const& params) {
  constexpr int kWarmup = 5, kIters = 20;
  constexpr size_t kFlushBytes = size_t(256) << 20;
  void* flush;
  CUDA_CHECK(cudaMalloc(&flush, kFlushBytes));
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  auto launch = [&] { launch_fwd<Cfg>(kKernel<Cfg>, params, nullptr); };
  for (int i = 0; i < kWarmup; ++i) launch();
  std::vector<float> times;
  for (int i = 0; i < kIters; ++i) {
    CUDA_CHECK(cudaMemsetAsync(flush, i, kFlushBytes));
    CUDA_CHECK(cudaEventRecord(start));
    launch();
    CUDA_CHECK(cudaEventRecord(stop));
    CUDA_CHECK(cudaEventSynchronize(stop));
    float ms;
    CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  CUDA_CHECK(cudaGetLastError());
  std::sort(times.begin(), times.end());
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  CUDA_CHECK(cudaFree(flush));
  return 0.5f * (times[kIters / 2 - 1] + times[kIters / 2]);
}


// ------------------------------------------------------------------------------------------------------------------
// Host self-test of the register-layout assumptions the kernel relies on (runs without a GPU: --layout-check).
// ------------------------------------------------------------------------------------------------------------------

template <class Cfg>
static bool layout_selftest() {
  constexpr int M = Cfg::kBlockM, N = Cfg::kBlockN, D = Cfg::kHeadDim;
  typename Cfg::TiledMmaQK mma_qk;
  typename Cfg::TiledMmaPV mma_pv;
  std::vector<int> owner_s(M * N, 0), owner_o(M * D, 0);
  int errors = 0;
  auto fail = [&](const char* what, int t) {
    if (errors++ < 10) std::printf("layout self-test: %s (thread %d)\n", what, t);
  };
  for (int t = 0; t < 128 * Cfg::kConsumerWarpgroups; ++t) {
    auto s_coords = mma_qk.get_thread_slice(t).partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    auto p_coords = mma_pv.get_thread_slice(t).partition_A(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    auto o_coords = mma_pv.get_thread_slice(t).partition_C(make_identity_tensor(Shape<Int<M>, Int<D>>{}));
    auto p_frag_shape = partition_shape_A(mma_pv, Shape<Int<M>, Int<N>>{});
    // The kernel writes P into a compact tensor of p_frag_shape in S's flat order: the coordinates must agree.
    if (size(s_coords) != size(p_coords) || size(p_frag_shape) != size(s_coords)) fail("P and S sizes differ", t);
    auto p_compact = make_layout(p_frag_shape);  // compact column-major, as make_tensor<Element>(shape) builds
    for (int i = 0; i < size(s_coords); ++i) {
      auto pc = p_coords(idx2crd(i, p_frag_shape));
      if (s_coords(i) != pc || p_compact(idx2crd(i, p_frag_shape)) != i) fail("P register order != S order", t);
    }
    auto s_rc = make_tensor(s_coords.data(), acc_rowcol(s_coords.layout()));
    auto o_rc = make_tensor(o_coords.data(), acc_rowcol(o_coords.layout()));
    if (size<0>(s_rc) != 2 || size<0>(o_rc) != 2) fail("expected 2 rows per thread", t);
    for (int r = 0; r < 2; ++r) {
      const int row = get<0>(s_rc(r, 0));
      // Rows of warpgroup w are 64w..64w+63; a quad (t ^ 1, t ^ 2) shares rows, so quad shuffles reduce a row.
      if (row / 64 != t / 128) fail("row outside the thread's warpgroup half", t);
      if (row % 64 != (t % 128) / 32 * 16 + (t % 32) / 4 + 8 * r) fail("row is not warp*16 + lane/4 + 8r", t);
      for (int c = 0; c < size<1>(s_rc); ++c) {
        if (get<0>(s_rc(r, c)) != row) fail("row view mixes rows (S)", t);
        owner_s[row * N + get<1>(s_rc(r, c))] += 1;
      }
      for (int c = 0; c < size<1>(o_rc); ++c) {
        if (get<0>(o_rc(r, c)) != row) fail("row view mixes rows (O)", t);
        if (c % 2 == 1 && get<1>(o_rc(r, c)) != get<1>(o_rc(r, c - 1)) + 1) fail("O column pair not adjacent", t);
        if (c % 2 == 0 && get<1>(o_rc(r, c)) % 2 != 0) fail("O column pair not 4-byte aligned", t);
        owner_o[row * D + get<1>(o_rc(r, c))] += 1;
      }
    }
  }
  for (int x : owner_s) if (x != 1) { fail("S element not owned exactly once", -1); break; }
  for (int x : owner_o) if (x != 1) { fail("O element not owned exactly once", -1); break; }
  std::printf("layout self-test D=%d: %s\n", D, errors == 0 ? "PASS" : "FAIL");
  return errors == 0;
}

static bool layout_selftests() { return layout_selftest<FwdConfig<128>>() & layout_selftest<FwdConfig<64>>(); }

// Every shape at head dim Cfg::kHeadDim: checked, then (S >= 1024, unless --check-only) timed. False on a failed
// check; exits on a hang.
template <class Cfg>
static bool run_head_dim(Options const& opt) {
  CUDA_CHECK(prepare_fwd<Cfg>(kKernel<Cfg>));
  constexpr int kHeadsQ = 32, kHeadsKV = 8, D = Cfg::kHeadDim;
  const float scale = 1.f / std::sqrt(float(D));
  // Odd lengths exercise the tail tile and the diagonal mask; the last three are the issue's timing shapes.
  const Shape4 shapes[] = {{1, 1}, {2, 17}, {1, 129}, {2, 1000}, {1, 4097}, {16, 1024}, {4, 4096}, {1, 16384}};
  bool all_ok = true;
  for (Shape4 shape : shapes) {
    const int B = shape.batch, S = shape.seqlen;
    if (S > opt.max_seqlen) continue;
    const int64_t n_q = int64_t(B) * S * kHeadsQ * D, n_kv = int64_t(B) * S * kHeadsKV * D;
    __nv_bfloat16 *q, *k, *v, *o;
    float* lse;
    CUDA_CHECK(cudaMalloc(&q, n_q * sizeof(__nv_bfloat16)));
    CUDA_CHECK(cudaMalloc(&k, n_kv * sizeof(__nv_bfloat16)));
    CUDA_CHECK(cudaMalloc(&v, n_kv * sizeof(__nv_bfloat16)));
    CUDA_CHECK(cudaMalloc(&o, n_q * sizeof(__nv_bfloat16)));
    CUDA_CHECK(cudaMalloc(&lse, int64_t(B) * kHeadsQ * S * sizeof(float)));
    fill_normal_kernel<<<1024, 256>>>(q, n_q, 1 + S);
    fill_normal_kernel<<<1024, 256>>>(k, n_kv, 2 + S);
    fill_normal_kernel<<<1024, 256>>>(v, n_kv, 3 + S);
    CUDA_CHECK(cudaMemset(o, 0xff, n_q * sizeof(__nv_bfloat16)));  // NaN pattern: unwritten rows show up
    CUDA_CHECK(cudaMemset(lse, 0xff, int64_t(B) * kHeadsQ * S * sizeof(float)));
    cudaEvent_t done;
    CUDA_CHECK(cudaEventCreate(&done));
    const FwdParams<Cfg> params = make_fwd_params<Cfg>(
        reinterpret_cast<const cutlass::bfloat16_t*>(q), reinterpret_cast<const cutlass::bfloat16_t*>(k),
        reinterpret_cast<const cutlass::bfloat16_t*>(v), reinterpret_cast<cutlass::bfloat16_t*>(o), lse, nullptr, B,
        S, 0, kHeadsQ, kHeadsKV, scale);
    launch_fwd<Cfg>(kKernel<Cfg>, params, nullptr);
    CUDA_CHECK(cudaGetLastError());
    CUDA_CHECK(cudaEventRecord(done));
    // A barrier-phase bug hangs instead of failing: give up after 20 s (the slowest shape takes milliseconds).
    char what[64];
    std::snprintf(what, sizeof(what), "B=%d S=%d", B, S);
    if (!wait_or_hang(done, 20, what)) std::exit(1);
    CUDA_CHECK(cudaEventDestroy(done));
    std::printf("B=%d S=%d Hq=%d Hkv=%d D=%d causal\n", B, S, kHeadsQ, kHeadsKV, D);
    all_ok &= check_shape(shape, kHeadsQ, kHeadsKV, D, q, k, v, o, lse, scale);
    if (!opt.check_only && S >= 1024) {
      const float ms = time_ms(params);
      const double flops = 4.0 * B * kHeadsQ * double(S) * S * D / 2;  // causal: half of the 4*S^2*D per head
      std::printf("  time %.3f ms, %.1f TFLOP/s\n", ms, flops / (ms * 1e-3) / 1e12);
    }
    CUDA_CHECK(cudaFree(q));
    CUDA_CHECK(cudaFree(k));
    CUDA_CHECK(cudaFree(v));
    CUDA_CHECK(cudaFree(o));
    CUDA_CHECK(cudaFree(lse));
  }
  return all_ok;
}

int main(int argc, char** argv) {
  Options opt;
  if (const int rc = start(argc, argv, opt, layout_selftests); rc >= 0) return rc;
  if (!hopper_device(kVersion)) return 1;
  bool all_ok = true;
  if (opt.runs(128)) all_ok &= run_head_dim<FwdConfig<128>>(opt);
  if (opt.runs(64)) all_ok &= run_head_dim<FwdConfig<64>>(opt);
  std::printf("%s\n", all_ok ? "ALL PASS" : "SOME CHECKS FAILED");
  return all_ok ? 0 : 1;
}

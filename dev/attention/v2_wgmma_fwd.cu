// v2_wgmma_fwd.cu: the ladder's v2 rung, which is the extension's Hopper forward: l3k::sm90::flash_fwd_sm90_kernel in
// csrc/attention/flash_fwd_sm90.cuh (v1 + softmax overlapped with wgmma within a warpgroup and ping-pong between the
// two consumer warpgroups; design in dev/attention/README.md). This file runs it under the standalone check and
// timing of harness.cuh, so the numbers here are those of the kernel the library dispatches.
//
//   make -C dev/attention && ./dev/attention/v2_wgmma_fwd            # check + time every shape
//   ./dev/attention/v2_wgmma_fwd --check-only --max-seqlen 1000      # no timing, short shapes (sanitizers)

#include "../../csrc/attention/flash_fwd_sm90.cuh"

using namespace l3k::sm90;

static constexpr const char* kVersion = "v2_wgmma_fwd";

// What harness.cuh runs, for each head dim's configuration.
template <class Cfg>
static void (*const kKernel)(FwdParams<Cfg>) = flash_fwd_sm90_kernel<Cfg>;

#include "harness.cuh"

"""Tile-scheduler sweep of the FP8 row-wise GEMM's prefill configuration against cuBLASLt, in one run.

    python3 bench/sweep_gemm.py [--m 8192] [--budget-ms 60]

For the large-M Llama 3 shapes where the prefill tiles trail torch._scaled_mm (bench/NOTES.md), times every
(L3K_GEMM_SWIZZLE, L3K_GEMM_RASTER) pair of the persistent scheduler on the default 128 x 128 cooperative tiles,
and the 64 x 128 ping-pong tiles (L3K_GEMM_PREFILL_TILE=pingpong, "pp" below) with the default order
(csrc/gemm/fp8_rowwise.cu reads all three at each call), with the bench's timer (L2 flushed, medians), next to
_scaled_mm row-wise on the same inputs. Prints one line per shape: cuBLASLt's time, then each setting's ratio
(cuBLASLt / ours: > 1 is faster). The best setting per shape is what pick_config's defaults should become; nothing
here changes them.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from llama3_kernels.bench import bench_gemm
from llama3_kernels.bench.harness import Context, Settings, Timer, env_set

SHAPES = [s for s in bench_gemm.SHAPES if s[0] in ("8B qkv", "8B o", "8B w13", "8B w2", "70B w13", "70B w2")]
SWIZZLES = ("1", "2", "4", "8")
RASTERS = ("heuristic", "m", "n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[8192, 1024])
    ap.add_argument("--budget-ms", type=float, default=60.0, help="timed span per setting")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sweep_gemm.py: needs a GPU")
    ctx = Context(torch.device("cuda"))
    timer = Timer(ctx.device, Settings(warmup=2, min_reps=5, max_reps=100, budget_ms=args.budget_ms))
    settings = [{"L3K_GEMM_SWIZZLE": s, "L3K_GEMM_RASTER": r} for s, r in itertools.product(SWIZZLES, RASTERS)]
    settings.append({"L3K_GEMM_PREFILL_TILE": "pingpong"})
    names = [
        f"{e['L3K_GEMM_SWIZZLE']}/{e['L3K_GEMM_RASTER'][0]}" if "L3K_GEMM_SWIZZLE" in e else "pp" for e in settings
    ]
    print(f"{torch.cuda.get_device_name()}; ratio = _scaled_mm / ours per (swizzle, raster), pp = ping-pong tiles")
    print("shape".ljust(22) + "cuBLASLt ms  " + "  ".join(n.rjust(6) for n in names) + "  best")
    for m, (name, n, k) in itertools.product(args.m, SHAPES):
        torch.manual_seed(0)
        i = bench_gemm._inputs(ctx, m, n, k)()
        base, _, _ = timer.measure(bench_gemm._scaled_mm(i))
        ratios = []
        for env in settings:
            with env_set(env):
                ms, _, _ = timer.measure(bench_gemm._ours(i))
            ratios.append(base / ms)
        best = max(range(len(settings)), key=ratios.__getitem__)
        cells = "  ".join(f"{r:6.3f}" for r in ratios)
        print(f"{name} M={m}".ljust(22) + f"{base:10.4f}  {cells}  {names[best]}")
        del i
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

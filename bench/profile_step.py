"""Where a training step's and a decode step's GPU time goes: kernels grouped by kind, ours against plain PyTorch.

    python3 bench/profile_step.py [--cpu] [--top 15]

The bench's Llama 3.2-1B-shaped model (bench_model.py: same weights in both), one training step at 2 x 4096
tokens (forward, cross-entropy, backward, no optimizer: the bench's own step functions) and one batch-1 decode step
with 4096 cached tokens, each after two warm-up steps, under torch.profiler. The training step also runs with the
opt-in Hopper attention kernels (unless bench/device_check.sh's gate kept them out). Prints the total CUDA time per kernel group (GEMM, attention,
norm, SwiGLU, cross-entropy, elementwise/other) and the top kernels. Eager only: the end-to-end rows of the bench
give the times; this says which kernels make the gap. `--cpu` runs the debug model on the CPU to check the
plumbing (CPU ops, not kernels).
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch

from llama3_kernels.bench import bench_model
from llama3_kernels.bench.bench_attention import SM90_ENV, sm90_skip
from llama3_kernels.bench.harness import Context

GROUPS = [  # first match wins; patterns on lower-cased kernel names (rope kernels live in l3k::attn: before "attn")
    ("rope", r"rope"),
    ("attention", r"flash|fmha|attn|sdpa|cudnn.*(mha|attention)|decode_attn|dkdv|dq_|dsum|dot_do_o"),
    ("gemm", r"gemm|cutlass|sm90_xmma|nvjet|cublas|fp8_rowwise|gemv|matmul|aten::(mm|bmm|addmm)$"),
    ("norm", r"rms_norm|layer_norm|rmsnorm|dw_reduce"),
    ("swiglu", r"swiglu|silu"),
    ("cross-entropy", r"log_softmax|softmax|nll|cross_entropy"),
    ("embedding", r"embedding|index_select|indexing_backward|scatter|gather"),
]


def group_of(name: str) -> str:
    low = name.lower()
    return next((g for g, pattern in GROUPS if re.search(pattern, low)), "elementwise/other")


def profile(fn, device: torch.device, warmup: int = 2) -> list[tuple[str, int, float]]:
    """(name, launches, ms) per kernel of one call of fn, slowest first (CPU: per op, self time)."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    totals: dict[str, list] = defaultdict(lambda: [0, 0.0])
    if cuda:
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:  # a kernel (or memcpy/memset) on the device
                totals[e.name][0] += 1
                totals[e.name][1] += e.time_range.elapsed_us() / 1e3
    else:
        for e in prof.key_averages():
            totals[e.key] = [e.count, e.self_cpu_time_total / 1e3]
    return sorted(((name, n, ms) for name, (n, ms) in totals.items() if ms > 0), key=lambda r: -r[2])


def report(title: str, rows, top: int) -> None:
    total = sum(r[2] for r in rows)
    print(f"\n== {title}: {total:.3f} ms of kernels")
    by_group = defaultdict(float)
    for name, _, ms in rows:
        by_group[group_of(name)] += ms
    for g, ms in sorted(by_group.items(), key=lambda x: -x[1]):
        print(f"  {g:<18} {ms:9.3f} ms  {ms / total:6.1%}")
    print(f"  top {top}:")
    for name, count, ms in rows[:top]:
        print(f"    {ms:9.3f} ms  x{count:<4} [{group_of(name)}] {name[:110]}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="the debug model on the CPU (plumbing check)")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("profile_step.py: needs a GPU (or --cpu)")
    ctx = Context(torch.device("cpu" if args.cpu else "cuda"))
    cfg = bench_model._config(ctx)
    b, s = (1, 64) if ctx.cpu else (2, 4096)
    dtype = torch.float32 if ctx.cpu else torch.bfloat16
    torch.manual_seed(0)
    inputs = bench_model._train_inputs(ctx, cfg, b, s, dtype)()
    variants = [("ours", "ours", None), ("plain", "plain", None)]
    if not ctx.cpu and sm90_skip(None) is None:
        variants.insert(1, ("ours + sm90 attention", "ours", SM90_ENV))
    for title, key, env in variants:
        step = bench_model._train_step(key, False, env)(inputs)
        report(f"train step {title} ({cfg.name}, {b}x{s}, {str(dtype)[6:]})", profile(step, ctx.device), args.top)
    del inputs
    cached = 64 if ctx.cpu else bench_model.CACHED
    dec = bench_model._decode_inputs(ctx, cfg, cached, cached + 64, dtype)()
    fns = {"ours": bench_model._ours_decode(graph=False)(dec), "plain": bench_model._plain_decode(False)(dec)}
    for key, fn in fns.items():
        report(f"decode step {key} (eager, {cached} cached)", profile(fn, ctx.device), args.top)


if __name__ == "__main__":
    main()

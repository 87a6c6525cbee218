"""Call every compiled kernel once on a small, odd-shaped input: the workload for compute-sanitizer.

  python3 bench/sanitize_cases.py --list                       the case names and the families that group them
  compute-sanitizer --tool memcheck python3 bench/sanitize_cases.py [CASE ...]    run cases in this process
  python3 bench/sanitize_cases.py --sanitize memcheck,racecheck --timeout-s 150 --log-dir DIR
        one compute-sanitizer process per family, all at once (a fault in one cannot hide the others'),
        each with its own log, a summary line each; exits 1 if any failed or timed out

Shapes are small (the sanitizer slows kernels 10-100×) and odd (M = 37, N = 760) so masked tails run.
Each launcher the extension lacks is reported and its case skipped; a launcher that runs but falls back to
the reference for these inputs would not be checked, so the cases use the dtypes and head dims the kernels
take. Under the sanitizer PyTorch's caching allocator is switched off (PYTORCH_NO_CUDA_MEMORY_CACHING=1),
so that a write past a tensor's end leaves its own allocation and memcheck sees it. Exits 1 if a case
raises, 2 without a GPU or with an unknown case name.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch


def _cases(dev: torch.device) -> dict[str, tuple[tuple[str, ...], object]]:
    """case name → (launchers it exercises, zero-argument callable)."""
    import llama3_kernels.ops as ops
    from llama3_kernels.bench.harness import env_set

    bf16 = torch.bfloat16

    def r(*shape, dtype=bf16, grad=False):
        return torch.randn(*shape, device=dev).to(dtype).requires_grad_(grad)

    def norm_fwd_bwd(residual: bool):
        x, w = r(37, 760, grad=True), r(760, grad=True)
        res = r(37, 760, grad=True) if residual else None
        out = ops.rms_norm(x, w, 1e-5, res)
        y = out[0] if residual else out
        torch.autograd.grad(y, (x, w), torch.randn_like(y))

    def swiglu_fwd_bwd():
        g, u = r(37, 760, grad=True), r(37, 760, grad=True)
        y = ops.swiglu(g, u)
        torch.autograd.grad(y, (g, u), torch.randn_like(y))
        gu = r(37, 2 * 760)  # the fused gate-up layout (strided halves)
        ops.swiglu(gu)

    def cross_entropy():
        for v in (1003, 4100):  # scalar and 4-wide vectors
            x = r(37, v, grad=True)
            t = torch.randint(0, v, (37,), device=dev)
            t[::5] = -100
            ops.cross_entropy(x, t).backward()

    def gemm():
        for m in (3, 16, 37, 200, 300):  # every fp8_rowwise_mm config: gemv, decode16, decode64, mid, prefill
            xq, xs = ops.quantize_fp8_rowwise(r(m, 528))  # K = 528: a tail past the GEMV's 512-byte warp step
            wq, ws = ops.quantize_fp8_rowwise(r(272, 528))
            ops.fp8_rowwise_mm(xq, xs, wq, ws)
            ops.fp8_rowwise_mm(xq, xs, wq, ws, bias=r(272))

    def attention(d: int):
        q, k, v = r(2, 77, 8, d, grad=True), r(2, 77, 2, d, grad=True), r(2, 77, 2, d, grad=True)
        out = ops.flash_attention(q, k, v, causal=True)
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))  # dQ fused into dK/dV (the default)
        for env in ({"L3K_BWD_FUSED_DQ": "0"}, {"L3K_BWD_TWO_MTILES": "0"}):  # the dQ kernel; the other fused tiling
            with env_set(env):
                torch.autograd.grad(ops.flash_attention(q, k, v, causal=True), (q, k, v), torch.randn_like(out))
        lens = [13, 64, 50, 27]  # packed documents, 154 tokens
        cu = torch.tensor([0, 13, 77, 127, 154], dtype=torch.int32, device=dev)
        qp, kp, vp = r(154, 8, d, grad=True), r(154, 2, d, grad=True), r(154, 2, d, grad=True)
        out = ops.flash_attention(qp, kp, vp, True, None, cu, max(lens))
        torch.autograd.grad(out, (qp, kp, vp), torch.randn_like(out))

    def decode(d: int):
        q, kc, vc = r(3, 1, 8, d), r(3, 300, 2, d), r(3, 300, 2, d)
        lens = torch.tensor([1, 150, 300], dtype=torch.int32, device=dev)
        ops.decode_attention(q, kc, vc, lens)  # 5 splits merged in a cluster
        with env_set({"L3K_DECODE_CLUSTER": "0"}):  # and through the workspaces and the combine kernel
            ops.decode_attention(q, kc, vc, lens)
        q = r(2, 5, 8, d)  # 20 rows a KV head: the many-row tile
        ops.decode_attention(q, kc[:2], vc[:2], lens[1:])

    def decode_linear():
        for m in (1, 3):  # N = 37: a last warp with one live row; K = 760 = 95 16-byte chunks
            w, h = r(37, 760), r(m, 760)
            ops.decode_linear(r(m, 760), w)
            ops.rms_norm_linear(r(m, 760), r(760), 1e-5, w, residual=h)
            ops.rms_norm_linear(r(m, 760), r(760), 1e-5, w)
            ops.swiglu_linear(r(m, 2 * 760), w)
        hq, hkv, d = 4, 2, 64  # the q/k/v GEMV with RoPE and the cache append: 512 rows, the last cache slots
        wqkv = r((hq + 2 * hkv) * d, 760)
        for b, s in ((1, 3), (3, 1)):
            rot = torch.polar(torch.ones(b, s, d // 2, device=dev), torch.rand(b, s, d // 2, device=dev))
            positions = torch.arange(50 - b * s, 50, device=dev).view(b, s)
            kc, vc = r(4, 50, hkv, d), r(4, 50, hkv, d)
            ops.rms_norm_qkv_rope_cache(r(b, s, 760), r(760), 1e-5, wqkv, rot, positions, kc, vc, hq, r(b, s, 760))

    def attention_sm90():
        from llama3_kernels.bench.bench_attention import SM90_ENV, sm90_skip

        if reason := sm90_skip(None):  # bench/device_check.sh: a kernel failed its standalone check
            print(f"flash_attention sm90: skipped, {reason}")
            return
        with env_set(SM90_ENV):  # the opt-in TMA + wgmma kernels
            for d in (128, 64):
                q, k, v = r(2, 77, 8, d, grad=True), r(2, 77, 2, d, grad=True), r(2, 77, 2, d, grad=True)
                out = ops.flash_attention(q, k, v, causal=True)
                torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
            cu = torch.tensor([0, 13, 77, 127, 154], dtype=torch.int32, device=dev)
            qp, kp, vp = r(154, 8, 128, grad=True), r(154, 2, 128, grad=True), r(154, 2, 128, grad=True)
            out = ops.flash_attention(qp, kp, vp, True, None, cu, 64)
            torch.autograd.grad(out, (qp, kp, vp), torch.randn_like(out))

    def rope_rotate(d: int):
        x = r(37, 8 + 2 * 2, d, grad=True)[:, :10]  # a fused projection's q and k heads (strided tokens)
        rot = torch.polar(torch.ones(37, d // 2, device=dev), torch.rand(37, d // 2, device=dev))
        ops.rope(x, rot).backward(r(37, 10, d))

    def rope(d: int):
        hq, hkv = 8, 2
        qkv = r(3, 2, (hq + 2 * hkv) * d)
        rot = torch.polar(torch.ones(3, 2, d // 2, device=dev), torch.rand(3, 2, d // 2, device=dev))
        positions = torch.tensor([[0, 1], [40, 41], [98, 99]], device=dev)  # the last slots of the cache
        ops.rope_kv_cache(qkv, rot, positions, r(4, 100, hkv, d), r(4, 100, hkv, d), hq)

    return {
        "rms_norm": (("rms_norm_fwd", "rms_norm_bwd"), lambda: norm_fwd_bwd(False)),
        "rms_norm residual": (("rms_norm_fwd", "rms_norm_bwd"), lambda: norm_fwd_bwd(True)),
        "rms_norm_fp8": (("rms_norm_fp8_fwd",), lambda: ops.rms_norm_fp8(r(37, 760), r(760), residual=r(37, 760))),
        "swiglu": (("swiglu_fwd", "swiglu_bwd"), swiglu_fwd_bwd),
        "swiglu_fp8": (("swiglu_fp8_fwd",), lambda: ops.swiglu_fp8(r(37, 760), r(37, 760))),
        "quantize_fp8_rowwise": (("quantize_fp8_rowwise",), lambda: ops.quantize_fp8_rowwise(r(37, 760))),
        "cross_entropy": (("cross_entropy_fwd", "cross_entropy_bwd"), cross_entropy),
        "fp8_rowwise_mm": (("fp8_rowwise_mm", "quantize_fp8_rowwise"), gemm),
        "decode_linear": (("decode_gemv", "decode_gemv_rope_cache"), decode_linear),
        "flash_attention d128": (("flash_attn_fwd", "flash_attn_bwd"), lambda: attention(128)),
        "flash_attention d64": (("flash_attn_fwd", "flash_attn_bwd"), lambda: attention(64)),
        "flash_attention sm90": (("flash_attn_fwd", "flash_attn_bwd"), attention_sm90),
        "decode_attention d128": (("decode_attn",), lambda: decode(128)),
        "rope_kv_cache d64": (("rope_kv_cache",), lambda: rope(64)),
        "rope d64": (("rope_rotate",), lambda: rope_rotate(64)),
    }


# cases whose kernel a device-check gate can switch off (the op then runs the reference: nothing to sanitize)
OFF_SWITCHES = {"decode_linear": "L3K_DECODE_GEMV", "cross_entropy": "L3K_CROSS_ENTROPY", "rope d64": "L3K_ROPE"}

# family → cases, one sanitizer process each
FAMILIES = {
    "norm": ("rms_norm", "rms_norm residual", "rms_norm_fp8", "quantize_fp8_rowwise", "cross_entropy"),
    "swiglu": ("swiglu", "swiglu_fp8"),
    "gemm": ("fp8_rowwise_mm", "decode_linear"),
    "attention": (
        "flash_attention d128",
        "flash_attention d64",
        "flash_attention sm90",
        "decode_attention d128",
        "rope_kv_cache d64",
        "rope d64",
    ),
}
# racecheck (shared-memory hazards) is far slower than memcheck: only the kernels that share tiles through
# shared memory, at these tiny sizes
RACECHECK = {
    "attention": ("flash_attention d64", "decode_attention d128"),
    "norm": ("rms_norm", "cross_entropy"),
    "gemm": ("decode_linear",),
}


def run_cases(names: list[str]) -> int:
    """Run the named cases (all when empty) in this process. Returns the exit status."""
    if not torch.cuda.is_available():
        print("sanitize_cases: no CUDA GPU")
        return 2
    from llama3_kernels.ops._common import has_kernel, switched_off

    dev = torch.device("cuda")
    cases = _cases(dev)
    unknown = [n for n in names if n not in cases]
    if unknown:
        print(f"sanitize_cases: unknown cases {unknown}; expected some of {list(cases)}")
        return 2
    failed = 0
    for name in names or list(cases):
        launchers, fn = cases[name]
        missing = [n for n in launchers if not has_kernel(n)]
        if missing:
            print(f"sanitize_cases: {name}: SKIPPED (not built: {', '.join(missing)})")
            continue
        switch = OFF_SWITCHES.get(name)
        if switch and switched_off(switch):  # a device-check gate turned the kernel off: the reference runs
            print(f"sanitize_cases: {name}: SKIPPED (switched off: {switch}=0)")
            continue
        try:
            fn()
            torch.cuda.synchronize()
            print(f"sanitize_cases: {name}: ran ({', '.join(launchers)})")
        except Exception:  # report every case, then fail
            failed += 1
            print(f"sanitize_cases: {name}: FAILED")
            traceback.print_exc()
    return 1 if failed else 0


def sanitizer() -> str:
    """The compute-sanitizer executable (PATH, then CUDA_HOME, then /usr/local/cuda)."""
    for cand in (shutil.which("compute-sanitizer"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                 "bin", "compute-sanitizer"), "/usr/local/cuda/bin/compute-sanitizer"):  # fmt: skip
        if cand and os.path.exists(cand):
            return cand
    raise FileNotFoundError("compute-sanitizer: not on PATH nor in $CUDA_HOME/bin or /usr/local/cuda/bin")


def sanitize(tools: list[str], timeout_s: float, log_dir: Path) -> int:
    """One sanitizer process per (tool, family), all started at once; a summary line each.

    Returns:
        0 when every process passed, 1 otherwise (a finding, a failed case, a timeout).
    """
    exe = sanitizer()
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1", PYTHONUNBUFFERED="1")
    jobs = []
    for tool in tools:
        for fam, names in (FAMILIES if tool == "memcheck" else RACECHECK).items():
            cmd = [exe, "--tool", tool, "--error-exitcode", "1", "--print-limit", "30"]
            if tool == "memcheck":
                cmd += ["--leak-check", "no"]
            cmd += [sys.executable, os.path.abspath(__file__), *names]
            log = log_dir / f"sanitize_{tool}_{fam}.log"
            handle = log.open("w")
            # its own process group (not session), so a timeout can end the sanitizer and the python under it
            group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
            proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, **group)
            jobs.append((tool, fam, proc, handle, log))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # an outer timeout: still end the children below
    deadline, bad = time.monotonic() + timeout_s, 0
    try:
        for tool, fam, proc, handle, log in jobs:
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the sanitizer and the python under it (own process group)
                proc.wait()
                rc = f"timed out after {timeout_s:.0f} s"
            handle.close()
            bad += _report(tool, fam, rc, log)
    finally:
        for *_, proc, _, _ in jobs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the sanitizer and the python under it (own process group)
                proc.wait()
    return 1 if bad else 0


def _report(tool: str, fam: str, rc: int | str, log: Path) -> int:
    """Print one summary line (and the findings) for one sanitizer process. Returns 1 if it failed."""
    text = log.read_text(errors="replace").splitlines()
    ran = sum(" ran (" in line for line in text)
    skipped = sum(": SKIPPED" in line for line in text)
    if rc == 0:
        print(f"{tool:9s} {fam:10s} ok ({ran} cases ran, {skipped} skipped)")
        return 0
    hits = [
        line
        for line in text
        if "=========" in line and " 0 errors" not in line and any(w in line for w in ("Invalid", "rror", "azard"))
    ]
    print(f"{tool:9s} {fam:10s} FAILED rc={rc} ({ran} cases ran, {skipped} skipped); log {log.name}:")
    for line in hits[:6] or text[-12:]:
        print(f"    {line}")
    return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("cases", nargs="*", help="case names (default: all)")
    p.add_argument("--list", action="store_true", help="print the case names by family")
    p.add_argument("--sanitize", metavar="TOOLS", help="memcheck,racecheck: run the families under compute-sanitizer")
    p.add_argument("--timeout-s", type=float, default=150.0, help="with --sanitize: wall-clock cap for them all")
    p.add_argument("--log-dir", default=".", help="with --sanitize: where each process's log goes")
    args = p.parse_args(argv)
    if args.list:
        for fam, names in FAMILIES.items():
            print(f"{fam}: {', '.join(names)}")
        return 0
    if args.sanitize:
        tools = [t.strip() for t in args.sanitize.split(",") if t.strip()]
        bad = [t for t in tools if t not in ("memcheck", "racecheck")]
        if bad or not tools:
            print(f"--sanitize: expected memcheck and/or racecheck, got {args.sanitize!r}")
            return 2
        return sanitize(tools, args.timeout_s, Path(args.log_dir))
    return run_cases(args.cases)


if __name__ == "__main__":
    sys.exit(main())

"""`l3k bench`: run the op families against their peers, write JSON / markdown / plots, gate regressions.

  l3k bench [--ops norm,swiglu,...] [--quick] [--json PATH] [--markdown PATH] [--plot DIR]
  l3k bench --compare BASELINE.json --max-regression 5% [--current RESULTS.json]

With --json / --markdown the files are rewritten after every row (env.complete false until the end), so a
run killed by an outer time limit still leaves every row it finished.

Exit status: 0 fine, 1 the regression gate failed (the regressed rows are named), 2 bad usage or
results that cannot be compared (different devices), 3 the CUDA context was lost mid-run (a kernel fault;
the rows after it say skipped).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import time
from pathlib import Path

import torch

from llama3_kernels.bench import harness

# family → module; the order is the run order (cheap, most-watched families first)
FAMILIES = {
    "ceiling": "llama3_kernels.bench.bench_ceiling",
    "norm": "llama3_kernels.bench.bench_norm",
    "swiglu": "llama3_kernels.bench.bench_swiglu",
    "loss": "llama3_kernels.bench.bench_loss",
    "rope": "llama3_kernels.bench.bench_rope",
    "fp8": "llama3_kernels.bench.bench_fp8",
    "gemm": "llama3_kernels.bench.bench_gemm",
    "attention": "llama3_kernels.bench.bench_attention",
    "decode": "llama3_kernels.bench.bench_decode",
    "model": "llama3_kernels.bench.bench_model",
}

SETTINGS = {  # (tier, quick) → how hard to measure
    ("full", False): harness.Settings(warmup=3, min_reps=10, max_reps=100, budget_ms=60.0),
    ("quick", True): harness.Settings(warmup=2, min_reps=5, max_reps=30, budget_ms=20.0),
    ("cpu", False): harness.Settings(warmup=1, min_reps=3, max_reps=20, budget_ms=30.0),
    ("cpu", True): harness.Settings(warmup=1, min_reps=3, max_reps=5, budget_ms=5.0),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="l3k bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--ops", default=",".join(FAMILIES), help=f"comma-separated families (default: all): {', '.join(FAMILIES)}"
    )
    p.add_argument("--quick", action="store_true", help="first shape of each op, fewer repeats (CPU: tiny sizes)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--json", metavar="PATH", help="write every row and the environment as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as markdown")
    p.add_argument("--plot", metavar="DIR", help="write one PNG per family (needs matplotlib)")
    p.add_argument("--compare", metavar="BASELINE", help="results JSON to gate against")
    p.add_argument("--max-regression", default="5%", help="allowed slowdown per row for --compare (default 5%%)")
    p.add_argument("--gate-all", action="store_true", help="gate peers' rows too, not only this project's")
    p.add_argument("--current", metavar="RESULTS", help="with --compare: judge this results JSON instead of running")
    p.add_argument("--budget-s", type=float, default=None, help="stop timing after this many seconds (rest: skipped)")
    p.add_argument(
        "--impl-timeout-s",
        type=float,
        default=180.0,
        help="abandon one impl after this many seconds, compilation included (an error row; default 180)",
    )
    p.add_argument("--no-compiled", action="store_true", help="skip the torch.compile / FlexAttention peers")
    p.add_argument("--compile-on-cpu", action="store_true", help="also time torch.compile peers on CPU")
    p.add_argument("--list", action="store_true", help="print the rows that would run, run nothing")
    p.add_argument("--no-progress", action="store_true")
    return p


def _families(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise ValueError(f"--ops: unknown families {unknown or text!r}; expected some of {', '.join(FAMILIES)}")
    return names


def collect(ctx: harness.Context, families: list[str]) -> list[harness.Case]:
    cases: list[harness.Case] = []
    for fam in families:
        cases += importlib.import_module(FAMILIES[fam]).cases(ctx)
    return cases


def _write(args: argparse.Namespace, env: dict, rows: list[dict], settings: dict) -> None:
    """Write the JSON and markdown that were asked for (each replaced whole, so a reader never sees half a file)."""
    for path, text in (
        (args.json, lambda: harness.dumps(env, rows, settings)),
        (args.markdown, lambda: harness.markdown(env, rows)),
    ):
        if path:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_text(text())
            tmp.replace(target)


def _row_line(row: dict) -> str:
    """One row as a log line: each impl's median or status."""
    cells = [
        f"{x['impl']} {x['ms']:.4g} ms" if x["status"] == "ok" else f"{x['impl']} {x['status']}" for x in row["results"]
    ]
    return f"{row['key']}: {'; '.join(cells)}"


def run(args: argparse.Namespace) -> dict:
    """Run the selected families and return the results document (partial files written as rows finish)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested but no CUDA GPU is visible")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    ctx = harness.Context(device, quick=args.quick, compile_on_cpu=args.compile_on_cpu)
    settings = dataclasses.replace(SETTINGS[(ctx.tier, args.quick)])  # a copy: the deadline is per run
    if args.impl_timeout_s is not None and not args.impl_timeout_s > 0:
        raise ValueError(f"--impl-timeout-s: expected a positive number of seconds, got {args.impl_timeout_s}")
    settings.impl_timeout_s = args.impl_timeout_s
    settings.run_compiled = not args.no_compiled
    families = _families(args.ops)
    torch.manual_seed(0)
    cases = collect(ctx, families)
    label = harness.CPU_LABEL if ctx.cpu else f"GPU timing ({torch.cuda.get_device_name(device)})"
    if ctx.cpu:
        print(f"bench: no GPU — {harness.CPU_LABEL}s of the reference paths at small sizes, not kernel numbers")
    threads = torch.get_num_threads()
    if ctx.cpu:  # one thread: OpenMP teams on a shared CPU stall for seconds at random, one thread does not
        torch.set_num_threads(1)
    try:
        env = harness.environment(device)  # before running: a kernel fault later must not cost the report
        start = time.monotonic()
        if args.budget_s is not None:
            settings.deadline = start + args.budget_s
        paths = harness.our_paths(device)
        saved = {k: v for k, v in vars(settings).items() if k != "deadline"}
        saved |= {"tier": ctx.tier, "budget_s": args.budget_s}
        env["tier"], env["families"], env["complete"] = ctx.tier, families, False

        def partial(rows: list[dict], index: int | None) -> None:
            env["wall_s"] = round(time.monotonic() - start, 1)
            _write(args, env, rows, saved)
            if args.no_progress and index is not None:  # a line per row: a log cut short shows where it was
                print(f"bench: {env['wall_s']:7.1f} s  {_row_line(rows[index])}", flush=True)

        rows = harness.run_cases(
            cases,
            device,
            settings,
            label,
            paths,
            progress=not args.no_progress,
            on_row=partial,
        )
    finally:
        torch.set_num_threads(threads)
    env["wall_s"], env["complete"] = round(time.monotonic() - start, 1), True
    env["cuda_context_lost"] = harness.cuda_broken(device)
    return {"schema": harness.SCHEMA, "env": env, "settings": saved, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    """Entry of `l3k bench`. Returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        max_reg = harness.parse_fraction(args.max_regression)
        if args.current and not args.compare:
            raise ValueError("--current: only meaningful with --compare BASELINE.json")
        baseline = harness.load_json(args.compare) if args.compare else None
        if args.list:
            ctx = harness.Context(torch.device("cuda" if torch.cuda.is_available() else "cpu"), quick=args.quick)
            for case in collect(ctx, _families(args.ops)):
                print(f"{case.family:10s} {case.key}   [{', '.join(i.name for i in case.impls)}]")
            return 0
        doc = harness.load_json(args.current) if args.current else run(args)
    except (ValueError, OSError) as e:
        print(f"l3k bench: {e}", file=sys.stderr)
        return 2

    if not args.current:
        print()
        print(harness.markdown(doc["env"], doc["rows"]))
        _write(args, doc["env"], doc["rows"], doc["settings"])
        for path in (args.json, args.markdown):
            if path:
                print(f"bench: wrote {path}")
        if args.plot:
            for path in harness.plot(doc["env"], doc["rows"], args.plot):
                print(f"bench: wrote {path}")
        if doc["env"].get("cuda_context_lost"):
            print(f"l3k bench: the CUDA context was lost: {doc['env']['cuda_context_lost']}", file=sys.stderr)
            return 3

    if baseline is None:
        return 0
    if not harness.same_device(baseline, doc):
        print(f"l3k bench: cannot compare: baseline measured on {harness.device_name(baseline['env'])}, "
              f"current on {harness.device_name(doc['env'])}", file=sys.stderr)  # fmt: skip
        return 2
    bad = harness.compare(baseline, doc, max_reg, all_impls=args.gate_all)
    if bad:
        print(f"REGRESSION: {len(bad)} row(s) slower than {args.compare} by more than {100 * max_reg:g}%:")
        for line in bad:
            print(f"  {line}")
        return 1
    print(f"bench: no row regressed by more than {100 * max_reg:g}% against {args.compare}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

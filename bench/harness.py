"""The bench harness: cases of (this project's op + its peers) on the same inputs, timed in one process.

A bench module yields `Case`s; each case holds an input factory and a list of `Impl`s that turn the inputs
into a zero-argument callable to time. `run_cases` times every impl of every case (CUDA events, L2 flushed
by writing a 256 MB buffer before each repeat, median of many repeats; host clock on CPU), derives TB/s,
TFLOP/s and MFU from the case's explicit minimum-bytes and FLOP formulas, and the ratio of this project's
time to the best peer's. Results go to JSON, markdown and PNG plots; `compare` is the regression gate.

Bounded for a short GPU lease: impls that compile (`Impl.compiles`) run in a second pass after every other
row; each impl has a wall-clock cap (compile included); an output with NaN/Inf, an exception or the cap
makes an error row, never a number; a lost CUDA context stops the run with the remaining rows skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

OURS = "llama3_kernels"
CPU_LABEL = "CPU reference timing"
PEAK_TFLOPS = {"bf16": 989.0, "fp8": 1979.0}  # H100 SXM dense tensor-core peaks (the MFU denominators)
FLUSH_BYTES = 256 * 1024 * 1024  # larger than any L2 (H100: 50 MB, H200: 60 MB)
# Before each timed call of an op row the GPU spins this long, so the host enqueues the call while the GPU is
# still busy: the events then time the device work, not the Python and launch overhead of the call (which
# CUDA graphs remove in real use). End-to-end rows (Case.host_bound) time without it, overhead included.
LEAD_US = 300.0
SCHEMA = "llama3_kernels.bench/1"


# ------------------------------------------------------------------------------------------- model
@dataclasses.dataclass
class Impl:
    """One contender in a case.

    Args:
        name: shown in tables ("llama3_kernels", "torch eager reference", "Liger-Kernel", ...).
        make: inputs → zero-argument callable that runs the op once (the thing timed).
        ours: True for this project's op.
        skip: a reason; the impl is not run and its row says "skipped: <reason>".
        bytes, flops: override the case's figures when this impl must move different bytes (bf16 vs fp8).
        peak: overrides the case's MFU denominator (an fp8 impl in a bf16 row).
        note: a short remark shown with the result; `make` may instead set a `note` attribute on the
            callable it returns (e.g. "K/V repeated: backend lacks GQA").
        compiles: the impl compiles (torch.compile, FlexAttention): it runs in the second pass, after every
            other impl of every row, so compile time cannot starve this project's rows.
    """

    name: str
    make: Callable[[Any], Callable[[], Any]] | None = None
    ours: bool = False
    skip: str | None = None
    bytes: float | None = None
    flops: float | None = None
    peak: float | None = None
    note: str = ""
    compiles: bool = False


@dataclasses.dataclass
class Case:
    """One table row: one op, mode and shape, timed for every impl on the same inputs."""

    family: str
    op: str
    mode: str  # "fwd", "fwd+bwd", "bwd", "decode", "train step", ...
    shape: str
    dtype: str
    inputs: Callable[[], Any]
    impls: list[Impl]
    bytes: float | None = None  # minimum bytes the op must move through device memory
    flops: float | None = None
    formula: str = ""  # how bytes / flops were counted, printed next to the numbers
    peak: float | None = None  # TFLOP/s denominator for MFU (None: no MFU column)
    unit: str = ""  # extra throughput unit for end-to-end rows ("tokens", with `items` per call)
    items: float | None = None
    api: str = ""  # the public op whose path (kernel or reference) this project's impl reports; default `op`
    host_bound: bool = False  # end-to-end rows: time host overhead too (no GPU spin ahead of each call)

    @property
    def key(self) -> str:
        return f"{self.op} | {self.mode} | {self.shape} | {self.dtype}"


@dataclasses.dataclass
class Result:
    impl: str
    ours: bool
    status: str  # "ok", "skipped" or "error"
    reason: str = ""
    ms: float | None = None  # median over `reps`
    ms_min: float | None = None
    reps: int = 0
    tbps: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    items_per_s: float | None = None
    path: str = ""  # for ours: "kernel", "reference" or "reference fallback (...)"
    note: str = ""


@dataclasses.dataclass
class Settings:
    """How hard to measure. `budget_ms` is the timed span per impl; repeats are chosen to fill it."""

    warmup: int = 3
    min_reps: int = 10
    max_reps: int = 200
    budget_ms: float = 150.0
    deadline: float | None = None  # time.monotonic() after which the remaining impls are skipped
    impl_timeout_s: float | None = None  # wall-clock cap per impl (make, check, warm-up, timing); None: none
    run_compiled: bool = True  # False: impls that compile are skipped


# ----------------------------------------------------------------------------------------- timing
class Timer:
    """Times a callable on one device. CUDA: events around each call, the L2 flushed before it."""

    def __init__(self, device: torch.device, settings: Settings, flush: bool = True) -> None:
        self.device, self.settings = device, settings
        self.cuda = device.type == "cuda"
        self._cache = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device) if self.cuda and flush else None

        # the spin counts SM clock cycles: LEAD_US at 2 GHz (Hopper boosts to 1.98 GHz; slower clocks spin longer)
        self._lead_cycles = int(LEAD_US * 2000) if self.cuda else 0

    def _flush(self, lead: bool = False) -> None:
        if lead and self._lead_cycles:
            with torch.cuda.device(self.device):
                torch.cuda._sleep(self._lead_cycles)  # keeps the GPU busy while the host enqueues the call
        if self._cache is not None:
            self._cache.zero_()  # a 256 MB write evicts every input from L2; it is not inside the events

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _one(self, fn: Callable[[], Any], lead: bool = True) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        self._flush(lead)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def measure(self, fn: Callable[[], Any], lead: bool = True) -> tuple[float, float, int]:
        """Returns (median ms, min ms, repeats) after warm-up (which also absorbs compilation).

        lead: spin the GPU ahead of each call (LEAD_US) so that device time is timed, not host overhead."""
        s = self.settings
        for _ in range(max(1, s.warmup)):
            fn()
        self._sync()
        estimate = min(self._one(fn, lead) for _ in range(2))
        reps = int(min(s.max_reps, max(s.min_reps, s.budget_ms / max(estimate, 1e-3))))
        if not self.cuda:
            times = [self._one(fn) for _ in range(reps)]
            return statistics.median(times), min(times), reps
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):  # queue everything, sync once: the host never stalls the GPU between repeats
            self._flush(lead)
            starts[i].record()
            fn()
            ends[i].record()
        self._sync()
        times = [a.elapsed_time(b) for a, b in zip(starts, ends)]
        return statistics.median(times), min(times), reps


# ------------------------------------------------------------------------------------------ running
BUDGET_SPENT = "time budget of this run exhausted"


class ImplTimeout(BaseException):
    """An impl ran past its wall-clock cap. A BaseException, so library code that catches Exception (a
    compiler falling back to eager, say) cannot swallow it and go on to time something else."""


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """Raise ImplTimeout in this thread after `seconds` (SIGALRM; a no-op off the main thread or without it)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not seconds or not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise ImplTimeout(f"abandoned after {seconds:.3g} s (wall-clock cap per impl, compilation included)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    outer, interval = signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    t0 = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:  # someone else's alarm (pytest-timeout's, say) was pending: re-arm what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(1e-3, outer - (time.monotonic() - t0)), interval)


@contextlib.contextmanager
def env_set(values: dict[str, str] | None):
    """Environment variables set for the duration (opt-in kernels read theirs at every call), then restored."""
    before = {k: os.environ.get(k) for k in values or {}}
    os.environ.update(values or {})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def _first_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text[:200]


def _figures(res: Result, case: Case, impl: Impl, on_gpu: bool) -> None:
    sec = res.ms / 1e3
    nbytes = impl.bytes if impl.bytes is not None else case.bytes
    flops = impl.flops if impl.flops is not None else case.flops
    if nbytes:
        res.tbps = nbytes / sec / 1e12
    if flops:
        res.tflops = flops / sec / 1e12
        peak = impl.peak if impl.peak is not None else case.peak
        if peak and on_gpu:  # a GPU peak means nothing for a CPU timing
            res.mfu = res.tflops / peak
    if case.items:
        res.items_per_s = case.items / sec


def check_finite(out: Any) -> None:
    """Raise ValueError when a floating-point tensor in `out` (nested tuples, lists, dicts) holds NaN or Inf.

    Raises:
        ValueError: naming the output's position, shape and dtype.
    """
    stack: list[tuple[str, Any]] = [("output", out)]
    while stack:
        where, x = stack.pop()
        if isinstance(x, torch.Tensor):
            if not x.is_floating_point() or x.numel() == 0:
                continue
            t = x.detach()
            if t.element_size() == 1:  # fp8: isfinite has no kernel for it everywhere; bf16 holds every value
                t = t.to(torch.bfloat16)
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{where} {tuple(x.shape)} {x.dtype} holds NaN or Inf: not timed")
        elif isinstance(x, (tuple, list)):
            stack += [(f"{where}[{i}]", y) for i, y in enumerate(x)]
        elif isinstance(x, dict):
            stack += [(f"{where}[{k!r}]", y) for k, y in x.items()]


def _limit(settings: Settings) -> float | None:
    """This impl's cap: the per-impl cap, shortened so that no impl runs far past the run's deadline."""
    cap = settings.impl_timeout_s
    if settings.deadline is not None:
        past = max(5.0, settings.deadline - time.monotonic() + 20.0)  # 20 s of grace past the deadline
        cap = past if cap is None else min(cap, past)
    return cap


def run_case(
    case: Case, timer: Timer, our_path: str = "", select: Callable[[Impl], bool] | None = None
) -> list[Result]:
    """Time every impl of `case` on one set of inputs. Failures become error rows, never numbers.

    Args:
        select: run only the impls it accepts (None: all); the others are left out of the returned list.

    Returns:
        One Result per selected impl, in the case's order.
    """
    impls = [i for i in case.impls if select is None or select(i)]
    results: list[Result] = []
    settings = timer.settings
    deadline = settings.deadline
    if not impls:
        return results
    if all(i.skip for i in impls) or (deadline is not None and time.monotonic() > deadline):
        return [Result(i.name, i.ours, "skipped", i.skip or BUDGET_SPENT) for i in impls]  # no inputs built
    try:
        with _time_limit(_limit(settings)):
            inputs = case.inputs()
    except (Exception, ImplTimeout) as e:  # e.g. out of memory: every impl of the row reports it
        reason = f"inputs: {_first_line(e)}"
        _free(timer.device)
        return [Result(i.name, i.ours, "skipped" if i.skip else "error", i.skip or reason) for i in impls]
    for impl in impls:
        res = Result(impl.name, impl.ours, "ok", path=our_path if impl.ours else "", note=impl.note)
        if impl.skip:
            res.status, res.reason = "skipped", impl.skip
        elif impl.compiles and not settings.run_compiled:
            res.status, res.reason = "skipped", "compiled peers not run (--no-compiled)"
        elif deadline is not None and time.monotonic() > deadline:
            res.status, res.reason = "skipped", BUDGET_SPENT
        else:
            fn = None
            try:
                with _time_limit(_limit(settings)):
                    fn = impl.make(inputs)
                    res.note = getattr(fn, "note", None) or res.note
                    check_finite(fn())  # one checked call first: NaN or Inf makes an error row, not a time
                    res.ms, res.ms_min, res.reps = timer.measure(fn, lead=not case.host_bound)
                _figures(res, case, impl, timer.cuda)
            except (Exception, ImplTimeout) as e:  # a peer that cannot run says why
                res.status, res.reason = "error", _first_line(e)
                res.ms = res.ms_min = None
                res.reps = 0
            del fn  # its closure holds this impl's tensors (a CUDA graph's pool too): free before the next
            _free(timer.device)
        results.append(res)
    del inputs
    _free(timer.device)
    return results


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        except Exception:  # a sticky CUDA error: cuda_broken() tells, the report still gets written
            pass


def cuda_broken(device: torch.device) -> str | None:
    """The error text when the CUDA context can no longer run work (a sticky error such as an illegal
    address poisons every later launch of the process); None when it is fine or the device is a CPU."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1).item()
    except Exception as e:
        return _first_line(e)
    return None


def best_peer(results: list[dict]) -> dict | None:
    peers = [r for r in results if not r["ours"] and r["status"] == "ok"]
    return min(peers, key=lambda r: r["ms"]) if peers else None


def row_dict(case: Case, results: list[Result], label: str) -> dict:
    """The JSON form of one row; `speedup_vs_best_peer` = best peer time / our time (>1: we are faster)."""
    rs = [dataclasses.asdict(r) for r in results]
    ours = next((r for r in rs if r["ours"] and r["status"] == "ok"), None)
    best = best_peer(rs)
    return {
        "key": case.key,
        "family": case.family,
        "op": case.op,
        "mode": case.mode,
        "shape": case.shape,
        "dtype": case.dtype,
        "label": label,
        "bytes": case.bytes,
        "flops": case.flops,
        "formula": case.formula,
        "peak_tflops": case.peak,
        "unit": case.unit,
        "results": rs,
        "best_peer": best["impl"] if best else None,
        "speedup_vs_best_peer": (best["ms"] / ours["ms"]) if (ours and best) else None,
    }


def run_cases(
    cases: list[Case],
    device: torch.device,
    settings: Settings,
    label: str,
    our_paths: dict[str, str] | None = None,
    progress: bool = True,
    on_row: Callable[[list[dict], int | None], None] | None = None,
) -> list[dict]:
    """Run every case (with a tqdm bar) and return the JSON rows, in the cases' order.

    Two passes: first every impl that does not compile, then (time left) the ones that do, merged into
    their rows. A lost CUDA context skips everything not yet run, with the reason.

    Args:
        on_row: called as on_row(rows so far, index of the row just timed) after each row (the deferred
            compiled impls shown as skipped until they run), and once more at the end with index None, so
            a caller can write partial results that survive a kill.
    """
    from tqdm import tqdm

    timer = Timer(device, settings)
    found: dict[int, list[Result]] = {}  # case index → results in impl order
    rows: list[dict] = []
    broken: str | None = None

    def deferred(case: Case) -> list[Impl]:
        return [i for i in case.impls if i.compiles and not i.skip]

    def merged(ci: int, case: Case) -> list[Result]:
        by = {r.impl: r for r in found.get(ci, [])}
        pending = "compiled peers run last, after every other row" if broken is None else None
        lost = f"not run: CUDA context lost ({broken})"
        return [by.get(i.name) or Result(i.name, i.ours, "skipped", i.skip or pending or lost) for i in case.impls]

    def emit(ci: int, case: Case) -> None:
        row = row_dict(case, merged(ci, case), label)
        if ci < len(rows):
            rows[ci] = row
        else:
            rows.append(row)
        if on_row is not None:
            on_row(rows, ci)

    passes = [("bench", lambda i: not i.compiles), ("bench (compiled peers)", lambda i: i.compiles)]
    for desc, select in passes:
        todo = [(ci, c) for ci, c in enumerate(cases) if desc == "bench" or deferred(c)]
        bar = tqdm(todo, desc=desc, unit="row", disable=not progress or not todo, dynamic_ncols=True)
        for ci, case in bar:
            bar.set_postfix_str(f"{case.op} {case.mode} {case.shape}"[:60])
            path = (our_paths or {}).get(case.api or case.op, "")
            if broken is None:
                try:
                    found.setdefault(ci, []).extend(run_case(case, timer, path, select))
                except Exception as e:  # never lose the other rows to one
                    found.setdefault(ci, []).extend(
                        Result(i.name, i.ours, "error", f"harness: {_first_line(e)}") for i in case.impls if select(i)
                    )
                broken = cuda_broken(device)
            emit(ci, case)
    reason = BUDGET_SPENT if broken is None else f"not run: CUDA context lost ({broken})"
    for ci, case in enumerate(cases):  # impls that never ran (the time budget, a lost context) say why
        have = {r.impl for r in found.get(ci, [])}
        found.setdefault(ci, []).extend(
            Result(i.name, i.ours, "skipped", i.skip or reason) for i in case.impls if i.name not in have
        )
        rows[ci] = row_dict(case, merged(ci, case), label)
    if on_row is not None:
        on_row(rows, None)
    return rows


# ------------------------------------------------------------------------------------ environment
def _git_commit() -> dict:
    # the device check exports the commit that bench/fetch_wheels.sh stamped right before the call: the device
    # machine's copy of .git was seen naming an older commit ("dirty") on a session's later calls
    stamped = os.environ.get("L3K_COMMIT", "").split()
    if stamped and stamped[0] != "unknown":
        return {"commit": stamped[0], "dirty": stamped[1:] == ["dirty"] if len(stamped) > 1 else False}
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)  # fmt: skip
        if commit.returncode == 0:
            return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": "unknown", "dirty": None}


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)  # fmt: skip
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed
        return None


def environment(device: torch.device) -> dict:
    """Where the numbers come from: commit, device, driver, library versions, date."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **_git_commit(),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "liger_kernel": _version("liger-kernel"),
        "device": "cpu",
        "gpu": None,
        "driver": None,
        # the run's switches (the device check turns off a default kernel that fails its gate: L3K_PDL=0, ...)
        "switches": {k: v for k, v in sorted(os.environ.items()) if k.startswith("L3K_") and k != "L3K_COMMIT"},
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(device="cuda", gpu=p.name, driver=_driver_version(),
                   capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count)  # fmt: skip
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    try:
        from llama3_kernels import info

        env["llama3_kernels"] = info()
    except Exception as e:  # the report must still be written
        env["llama3_kernels"] = f"info() failed: {_first_line(e)}"
    return env


def device_name(env: dict) -> str:
    return env.get("gpu") or f"cpu ({env.get('cpu', 'unknown')})"


# ---------------------------------------------------------------------------------------- outputs
def dumps(env: dict, rows: list[dict], settings: dict) -> str:
    """The results document as JSON text (what `write_json` writes and `load_json` reads)."""
    doc = {"schema": SCHEMA, "env": env, "settings": settings, "rows": rows}
    return json.dumps(doc, indent=1, default=str) + "\n"


def write_json(path: str | Path, env: dict, rows: list[dict], settings: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(dumps(env, rows, settings))


def load_json(path: str | Path) -> dict:
    """Read a results file written by `write_json`.

    Raises:
        ValueError: the file is not a results file of this harness.
    """
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("rows"), list):
        raise ValueError(f"{path}: not a llama3_kernels bench results file (schema {SCHEMA})")
    return doc


def _fmt_num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return ""
    if x == 0 or not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def _cell(r: dict, unit: str, notes: list[str]) -> str:
    if r["status"] != "ok":  # reasons go to numbered notes under the table, the cell keeps its number
        text = f"{r['status']}: {r['reason']}".replace("|", "/")
        if text not in notes:
            notes.append(text)
        return f"{r['status']} [{notes.index(text) + 1}]"
    parts = [f"{r['ms']:.4g} ms"]
    if r.get("tflops") is not None:
        parts.append(f"{r['tflops']:.4g} TFLOP/s")
        if r.get("mfu") is not None:
            parts.append(f"MFU {100 * r['mfu']:.1f}%")
    if r.get("tbps") is not None and (r.get("tflops") is None or r["tbps"] > 0.05):
        parts.append(f"{r['tbps']:.3g} TB/s")
    if r.get("items_per_s") is not None:
        parts.append(f"{_fmt_num(r['items_per_s'])} {unit}/s")
    if r.get("path") and r["path"] != "kernel":
        parts.append(f"[{r['path']}]")
    if r.get("note"):
        parts.append(f"({r['note']})")
    return " · ".join(parts).replace("|", "/")


def markdown(env: dict, rows: list[dict]) -> str:
    """A table per op family: one column per impl, the ratio to the best peer last, formulas below."""
    cpu = env.get("device") == "cpu"
    lines = [f"# llama3_kernels bench — {device_name(env)}", ""]
    lines.append(
        f"commit `{env.get('commit', '?')[:12]}`{' (dirty)' if env.get('dirty') else ''} · torch {env.get('torch')}"
        f" · CUDA {env.get('cuda')} · driver {env.get('driver')} · {env.get('date')}"
    )
    lines.append("")
    if env.get("complete") is False:
        lines += [
            "**Partial results**: written while the run was still going (it was stopped or is still running);",
            "rows it had not reached are missing or say skipped.",
            "",
        ]
    if cpu:
        lines += [
            f"**{CPU_LABEL}s only.** No GPU was visible: every number below is the PyTorch reference path (and",
            "CPU peers) at small sizes. None of them is a kernel number.",
            "",
        ]
    lines += [
        "Times are medians of repeated runs (CUDA events, L2 flushed before each; host clock on CPU). Op rows "
        f"time device work: the GPU spins {LEAD_US:.0f} us before each call so that the host's launch overhead "
        "stays outside the events; end-to-end rows (model) include it. "
        "*vs best peer* = best peer's time / this project's time (>1: faster).",
        "",
    ]
    families: dict[str, list[dict]] = {}
    for r in rows:
        families.setdefault(r["family"], []).append(r)
    for fam, frows in families.items():
        impls: list[str] = []
        for r in frows:
            impls += [x["impl"] for x in r["results"] if x["impl"] not in impls]
        lines += [f"## {fam}", ""]
        head = ["op", "mode", "shape", *impls, "vs best peer"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        notes: list[str] = []
        for r in frows:
            by = {x["impl"]: x for x in r["results"]}
            cells = [_cell(by[i], r.get("unit") or "items", notes) if i in by else "" for i in impls]
            sp = r.get("speedup_vs_best_peer")
            ratio = f"{sp:.2f}× ({r['best_peer']})" if sp is not None else "n/a"
            if cpu:
                ratio += f" — {CPU_LABEL}"
            lines.append("| " + " | ".join([r["op"], r["mode"], r["shape"], *cells, ratio]) + " |")
        formulas = []
        for r in frows:
            f = f"- `{r['op']}` {r['mode']}: {r['formula']}"
            if r["formula"] and f not in formulas:
                formulas.append(f)
        lines += ["", *[f"[{i + 1}] {t}  " for i, t in enumerate(notes)], "", "Counting:", *formulas, ""]
    return "\n".join(lines) + "\n"


def plot(env: dict, rows: list[dict], out_dir: str | Path) -> list[Path]:
    """One PNG per family: bars per impl for each row (TFLOP/s where FLOPs were counted, else TB/s).

    Returns the paths written; an empty list (with a printed note) when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib not installed, no plots (pip install matplotlib)")
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    families: dict[str, list[dict]] = {}
    for r in rows:
        families.setdefault(r["family"], []).append(r)
    written = []
    for fam, frows in families.items():
        use_flops = any(x.get("tflops") for r in frows for x in r["results"] if x["status"] == "ok" and r["flops"])
        metric, ylabel = ("tflops", "TFLOP/s") if use_flops else ("tbps", "TB/s")
        if all(x.get(metric) is None for r in frows for x in r["results"]):
            metric, ylabel = "ms", "ms (lower is better)"
        impls: list[str] = []
        for r in frows:
            impls += [x["impl"] for x in r["results"] if x["impl"] not in impls]
        fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(frows) * max(1, len(impls)) / 3), 5))
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            vals = []
            for r in frows:
                x = next((x for x in r["results"] if x["impl"] == impl), None)
                vals.append(x.get(metric) if x and x["status"] == "ok" and x.get(metric) is not None else 0.0)
            ax.bar([i + j * width for i in range(len(frows))], vals, width, label=impl)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(frows))])
        ax.set_xticklabels([f"{r['op']}\n{r['mode']}\n{r['shape']}" for r in frows], fontsize=6, rotation=60)
        ax.set_ylabel(ylabel)
        title = f"{fam} — {device_name(env)}"
        if env.get("device") == "cpu":
            title += f" — {CPU_LABEL}s, not kernel numbers"
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{fam}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# --------------------------------------------------------------------------------------- the gate
def parse_fraction(text: str) -> float:
    """'5%' → 0.05, '0.05' → 0.05.

    Raises:
        ValueError: not a non-negative number or percentage.
    """
    t = str(text).strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise ValueError(
            f"--max-regression: expected a percentage like 5% or a fraction like 0.05, got {text!r}"
        ) from None
    if not value >= 0:
        raise ValueError(f"--max-regression: expected a non-negative value, got {text!r}")
    return value


def compare(baseline: dict, current: dict, max_regression: float, all_impls: bool = False) -> list[str]:
    """Rows of `current` slower than `baseline` by more than `max_regression` (a fraction).

    Compares this project's impl in every row present in both (every impl with `all_impls`). A row that
    timed fine in the baseline and fails or is skipped now counts as a regression; rows new in `current`
    or absent from it are not judged (the op set may change).

    Returns:
        One message per regressed row; empty when the gate passes.
    """
    cur = {(r["key"], x["impl"]): x for r in current["rows"] for x in r["results"]}
    bad = []
    for row in baseline["rows"]:
        for base in row["results"]:
            if base["status"] != "ok" or not (base["ours"] or all_impls):
                continue
            now = cur.get((row["key"], base["impl"]))
            if now is None:
                continue
            name = f"{row['key']} [{base['impl']}]"
            if now["status"] != "ok":
                bad.append(f"{name}: was {base['ms']:.4g} ms, now {now['status']}: {now['reason']}")
            elif now["ms"] > base["ms"] * (1.0 + max_regression):
                slower = now["ms"] / base["ms"] - 1.0
                bad.append(f"{name}: {base['ms']:.4g} ms → {now['ms']:.4g} ms (+{100 * slower:.1f}%)")
    return bad


def same_device(baseline: dict, current: dict) -> bool:
    return device_name(baseline["env"]) == device_name(current["env"])


def iter_rows(doc: dict, family: str | None = None) -> Iterable[dict]:
    return (r for r in doc["rows"] if family is None or r["family"] == family)


# ------------------------------------------------------------------------ what bench modules share
@dataclasses.dataclass
class Context:
    """What a bench module needs to build its cases: the device, the size tier and input helpers.

    Tiers: "full" (GPU, the issue's shapes), "quick" (GPU, the first shape of each op, shorter timing)
    and "cpu" (no GPU: the reference paths at small sizes, labelled CPU reference timings).
    """

    device: torch.device
    quick: bool = False
    compile_on_cpu: bool = False

    @property
    def cpu(self) -> bool:
        return self.device.type != "cuda"

    @property
    def tier(self) -> str:
        return "cpu" if self.cpu else ("quick" if self.quick else "full")

    def pick(self, full, quick=None, cpu=None):
        """The value for this tier (quick defaults to full[:1], cpu to quick)."""
        quick = full[:1] if quick is None else quick
        return {"full": full, "quick": quick, "cpu": quick if cpu is None else cpu}[self.tier]

    def randn(self, *shape: int, dtype=torch.bfloat16, scale: float = 1.0, grad: bool = False) -> torch.Tensor:
        t = (torch.randn(*shape, device=self.device, dtype=torch.float32) * scale).to(dtype)
        return t.requires_grad_(grad)

    # Reasons a peer does not run here (None: it runs).
    def needs_cuda(self) -> str | None:
        return "needs a CUDA GPU" if self.cpu else None

    def compile_skip(self) -> str | None:
        if self.cpu and not self.compile_on_cpu:
            return "torch.compile peers run on the GPU only (CPU inductor compile time; --compile-on-cpu)"
        return None

    def module_skip(self, module: str, what: str, cuda: bool = True) -> str | None:
        if cuda and self.cpu:
            return "needs a CUDA GPU"
        try:
            __import__(module)
        except Exception as e:  # missing, or broken against this torch
            return f"{what} not importable ({_first_line(e)[:80]})"
        return None


def our_paths(device: torch.device) -> dict[str, str]:
    """For each public op, the path this project's impl takes here: kernel, or the reference and why."""
    from llama3_kernels.info import OP_KERNELS
    from llama3_kernels.ops._common import has_kernel

    if device.type != "cuda":
        return dict.fromkeys(OP_KERNELS, "reference (CPU)")
    hopper = torch.cuda.get_device_capability(device) == (9, 0)
    paths = {}
    for op, names in OP_KERNELS.items():
        built = [n for n in names if has_kernel(n)]
        if not hopper:
            paths[op] = "reference fallback (no sm_90 GPU)"
        elif len(built) == len(names):
            paths[op] = "kernel"
        elif built:
            paths[op] = f"partial kernel (missing {', '.join(n for n in names if n not in built)})"
        else:
            paths[op] = "reference fallback (kernel not built)"
    return paths


_COMPILE_READY = False


def compiled(fn: Callable, **kwargs) -> Callable:
    """torch.compile with static shapes and a recompile limit large enough for every bench shape."""
    global _COMPILE_READY
    if not _COMPILE_READY:
        from torch import _dynamo  # (an `import torch._dynamo` here would make `torch` a local name)

        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
            if hasattr(_dynamo.config, name):
                setattr(_dynamo.config, name, max(256, getattr(_dynamo.config, name)))
        _COMPILE_READY = True
    return torch.compile(fn, dynamic=False, **kwargs)


def grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], dout: torch.Tensor):
    """Backward without accumulating into .grad (so repeats do identical work)."""
    return torch.autograd.grad(out, inputs, dout)

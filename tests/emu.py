"""The CPU emulator of the kernels (csrc/emu) for the tests: `emulated()` points the ops' CUDA paths at `_C_emu`
for CPU tensors, so `_<op>_cuda(...)` runs the kernels' own code on this machine."""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import sys
from pathlib import Path

import torch

import llama3_kernels.ops as ops_pkg
from llama3_kernels.ops import _common

ROOT = Path(__file__).resolve().parents[1]
NUM_SMS = 8  # the emulated device's SM count: the split and grid heuristics see a small GPU


def _builder():
    if "l3k_emu_build" not in sys.modules:
        spec = importlib.util.spec_from_file_location("l3k_emu_build", ROOT / "csrc" / "emu" / "build.py")
        build = importlib.util.module_from_spec(spec)
        sys.modules["l3k_emu_build"] = build
        spec.loader.exec_module(build)
    return sys.modules["l3k_emu_build"]


def available() -> str | None:
    """None when the emulator can be built here (a C++ compiler, pybind11, the CUDA headers), else why not."""
    if shutil.which("g++") is None:
        return "no g++"
    try:
        import pybind11  # noqa: F401

        _builder()._cuda_include()
    except (ImportError, RuntimeError) as e:
        return str(e)
    return None


_module = None


def module():
    global _module
    if _module is None:
        _module = _builder().load()
    return _module


def _use_kernel(name: str, *tensors, align: int = 16) -> bool:
    return _common.has_kernel(name) and all(t is None or t.data_ptr() % align == 0 for t in tensors)


def _cuda_impls(mod) -> dict:
    """The module's custom ops that have a CUDA kernel registered: name -> that implementation."""
    out = {}
    for name, value in vars(mod).items():
        fns = getattr(value, "_backend_fns", None)  # torch.library CustomOpDef (private: tests only)
        if isinstance(fns, dict) and "cuda" in fns:
            out[name] = fns["cuda"]
    return out


@contextlib.contextmanager
def emulated(route_ops: bool = False):
    """Within: the ops' launchers are the emulator's, CPU tensors count as an sm_90 device's, and torch.empty /
    empty_like fill floating tensors with NaN (an output element a kernel fails to write shows). route_ops: the
    ops' module-level custom ops are replaced by their CUDA implementations too, so that the public ops (and a model
    built on them) run the kernels on CPU tensors (no autograd: inference only)."""
    mods = [_common] + [m for n, m in sys.modules.items() if n.startswith(ops_pkg.__name__ + ".")]
    patches = {
        "_C": module(),
        "is_sm90": lambda index: True,
        "stream": lambda t: 0,
        "sm_count": lambda index: NUM_SMS,
        "use_cuda_kernel": _use_kernel,
        "_max_cluster": lambda index, d, dtype_code, rows: module().decode_attn_max_cluster(d, dtype_code, rows),
    }

    def poisoned(make):
        def wrapped(*args, **kwargs):  # outputs the kernels must write start as NaN
            t = make(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        return wrapped

    saved = [(torch, "empty", torch.empty), (torch, "empty_like", torch.empty_like)]
    torch.empty, torch.empty_like = poisoned(torch.empty), poisoned(torch.empty_like)
    for m in mods:
        routed = _cuda_impls(m) if route_ops else {}
        for name, value in [*patches.items(), *routed.items()]:
            if name in vars(m):
                saved.append((m, name, vars(m)[name]))
                setattr(m, name, value)
    try:
        yield
    finally:
        for m, name, value in reversed(saved):
            setattr(m, name, value)


def run(fn, *args, **kwargs):
    """fn(*args) under the emulator, in inference mode (the impls are custom-op bodies); it must launch a kernel,
    not take the op's reference path."""
    before = module().emu_launches()
    with emulated(), torch.inference_mode():
        result = fn(*args, **kwargs)
    assert module().emu_launches() > before, f"{fn.__name__}: no kernel ran (the op took its reference path)"
    return result

"""Shared plumbing for the ops: the compiled extension, argument checks, and raw-pointer helpers.

Kernels in `_C` never see torch: Python hands them `data_ptr()`s, sizes, strides, a dtype code and the
current CUDA stream. `kernel(name)` returns the launcher when it was compiled in and a GPU is usable.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    from llama3_kernels import _C  # type: ignore[attr-defined]
except ImportError:  # pure-Python install: every op runs its reference
    _C = None

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float8_e4m3fn: 3}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def has_kernel(name: str) -> bool:
    """True when the extension was built with launcher `name`."""
    return _C is not None and hasattr(_C, name)


def kernel(name: str):
    """The launcher `_C.<name>`, or None when it was not built."""
    return getattr(_C, name, None) if _C is not None else None


def stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


# -------------------------------------------------------------------------------------------- checks
def check_tensor(name: str, t, *, dtypes=None, ndim=None, min_ndim=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({want}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dims, got shape {tuple(t.shape)}")


def check_same_device(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for n, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{n}: expected device {first.device} (like {first_name}), got {t.device}")


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected a unit stride in the last dim, got strides {t.stride()}")


def rows_view(name: str, t: torch.Tensor) -> torch.Tensor:
    """[..., N] → [M, N] without copying where strides allow; the last dim must have unit stride."""
    check_last_dim_contiguous(name, t)
    return t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t


@functools.cache
def is_sm90(device_index: int) -> bool:
    """The kernels are compiled for sm_90a only: any other card runs the references."""
    return torch.cuda.get_device_capability(device_index) == (9, 0)


def switched_off(switch: str) -> bool:
    """A default kernel turned off by its switch set to "0" (L3K_DECODE_GEMV, L3K_DECODE_CLUSTER, L3K_CROSS_ENTROPY,
    L3K_ROPE), e.g. by bench/device_check.sh when its tests fail on a new device: the op then runs its reference,
    unfused or former path.
    Read at every call, so tests and benches can flip it."""
    return os.environ.get(switch) == "0"


def use_cuda_kernel(name: str, *tensors: torch.Tensor, align: int = 16) -> bool:
    """Whether the compiled launcher `name` should run for these CUDA tensors on an sm_90 device.

    `align` is the byte alignment the launcher needs of every pointer: 16 for TMA/cp.async kernels (the
    default); the row-wise norm-family kernels pick their vector width from the alignment, so they pass 1.
    """
    first = next(t for t in tensors if t is not None)
    return (
        has_kernel(name)
        and is_sm90(first.device.index if first.device.index is not None else torch.cuda.current_device())
        and all(t is None or t.data_ptr() % align == 0 for t in tensors)
    )


def use_rowwise_kernel(name: str, activations: tuple, others: tuple = ()) -> bool:
    """Norm-family launchers: `activations` (None allowed) must share one 16-bit dtype; `others` (weights,
    statistics) only need to be on the device. Any element alignment works (the vector width adapts)."""
    dtype = activations[0].dtype
    return (
        dtype in HALF_DTYPES
        and all(t is None or t.dtype == dtype for t in activations)
        and use_cuda_kernel(name, *activations, *others, align=1)
    )


def on_input_device(fn):
    """Run a CUDA implementation with its first tensor argument's device current: launchers use the current one."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        device = next(a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        if device.type != "cuda":  # the CPU emulator of the kernels (csrc/emu, tests/test_emu.py)
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    return wrapped

"""Atomic checkpoints and the resume compatibility check.

A checkpoint is one torch.save'd dict (tensors, numbers, strings, lists: loadable with weights_only=True):
config, step, data position, model and optimizer state as full (unsharded) state dicts keyed by parameter
name, and RNG states. Full state dicts make a checkpoint independent of the world size that wrote it.
Writes go to a temporary file in the same folder, are fsync'd, then os.replace'd over the old file, so a
crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from llama3_kernels.training.config import TrainConfig


def save_atomic(obj, path: str | Path) -> None:
    """torch.save `obj` to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: str | Path) -> dict:
    """Load a checkpoint onto the CPU.

    Raises:
        FileNotFoundError: naming the missing checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """The process's RNG states (torch CPU, CUDA when present, Python's random)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def check_compatible(saved: dict, cfg: TrainConfig, model_cfg: dict) -> None:
    """Refuse to resume a checkpoint written by a different run.

    Args:
        saved: the checkpoint's "config" (TrainConfig.to_dict()) and "model_config" entries, as a dict with
            those two keys.
        cfg: this run's config.
        model_cfg: this run's ModelConfig as a dict.
    Raises:
        ValueError: naming each field that differs, with both values.
    """
    diffs = []
    for key, value in model_cfg.items():
        old = saved["model_config"].get(key)
        if _norm(old) != _norm(value):
            diffs.append(f"model.{key}: checkpoint {old!r}, now {value!r}")
    mine = cfg.to_dict()
    for key in TrainConfig.RESUME_KEYS:
        old = saved["config"].get(key)
        if _norm(old) != _norm(mine[key]):
            diffs.append(f"{key}: checkpoint {old!r}, now {mine[key]!r}")
    if diffs:
        raise ValueError("resume: the checkpoint was written by another config; " + "; ".join(diffs))


def _norm(x):
    return [_norm(v) for v in x] if isinstance(x, list | tuple) else x

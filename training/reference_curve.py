"""The stored reference loss curve: a short fixed-seed debug run on the embedded corpus.

    python -m llama3_kernels.training.reference_curve      # rewrites training/reference_loss_debug.json

tests/test_training.py reruns the same config and compares its losses with the stored ones. The corpus is this
Python's standard library, so the file records the corpus fingerprint: a different Python version has other
sources and therefore another curve.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
from pathlib import Path

import torch

from llama3_kernels.training.config import TrainConfig
from llama3_kernels.training.train import train

PATH = Path(__file__).with_name("reference_loss_debug.json")


def reference_config(out: str | Path) -> TrainConfig:
    """The reference run: debug model, 1024 tokens per step, short warm-up, cosine over the whole run."""
    return TrainConfig(
        model="debug", steps=30, warmup=5, seq_len=128, batch_size=8, lr=3e-3, eval_every=15, eval_rows=16,
        ckpt_every=0, corpus_bytes=300_000, seed=0, out=str(out), progress=False,
    )  # fmt: skip


def run(out: str | Path) -> dict:
    """Train the reference config into `out`; returns the curve and what it depends on."""
    records = train(reference_config(out))
    corpus = json.loads((Path(out) / "config.json").read_text())["corpus"]
    return {
        "config": reference_config(out).to_dict() | {"out": None},
        "corpus_sha256": corpus["sha256"],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "train_loss": [r["loss"] for r in records if r["type"] == "train"],
        "eval_loss": {str(r["step"]): r["loss"] for r in records if r["type"] == "eval"},
    }


def main(argv: list[str] | None = None) -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        result = run(out)
    # the tolerance's basis: the same math summed in another order (two micro-steps of 4 rows instead of one of 8),
    # as another machine's BLAS would; the thread count alone does not change this CPU's sums
    with tempfile.TemporaryDirectory() as out:
        records = train(dataclasses.replace(reference_config(out), grad_accum=2))
    drift = [abs(a - r["loss"]) for a, r in zip(result["train_loss"], [r for r in records if r["type"] == "train"])]
    result["drift_vs_reordered_sums"] = {"max_abs": max(drift), "last_abs": drift[-1]}
    PATH.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {PATH}: loss {result['train_loss'][0]:.4f} → {result['train_loss'][-1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

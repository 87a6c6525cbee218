"""Every row of `l3k bench` as pytest-benchmark benchmarks: one test per (family, row, impl)."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from llama3_kernels.bench.cli import FAMILIES
from llama3_kernels.bench.harness import Context

pytest.importorskip("pytest_benchmark")

# quick tier unless L3K_BENCH_FULL=1; the CPU reference tier without a GPU
_CTX = Context(
    torch.device("cuda" if torch.cuda.is_available() else "cpu"), quick=os.environ.get("L3K_BENCH_FULL") != "1"
)
PARAMS = [
    pytest.param(case, impl, id=f"{fam}|{case.op}|{case.mode}|{case.shape}|{impl.name}")
    for fam, module in FAMILIES.items()
    for case in importlib.import_module(module).cases(_CTX)
    for impl in case.impls
]


@pytest.mark.parametrize("case,impl", PARAMS)
def test_bench(run_impl, case, impl):
    run_impl(case, impl)

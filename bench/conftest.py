"""pytest-benchmark entry: `pytest bench/ --benchmark-json out.json` times every (row, impl) of `l3k bench`.

Sizes: the quick tier by default, the issue's full shapes with L3K_BENCH_FULL=1; on a machine without a
GPU, the CPU reference tier (each benchmark's extra_info says "CPU reference timing"). pytest-benchmark
times with the host clock around each call plus a CUDA synchronize, so its figures include launch latency;
`l3k bench` (CUDA events) is the source of record.
"""

from __future__ import annotations

import pytest
import torch

from llama3_kernels.bench import harness

pytest.importorskip("pytest_benchmark")


@pytest.fixture(scope="session")
def flush_l2():
    """A callable that evicts L2 (writes 256 MB) and waits; a no-op on CPU."""
    if not torch.cuda.is_available():
        return lambda: None
    cache = torch.empty(harness.FLUSH_BYTES, dtype=torch.int8, device="cuda")

    def flush():
        cache.zero_()
        torch.cuda.synchronize()

    return flush


@pytest.fixture
def run_impl(benchmark, flush_l2):
    """run_impl(case, impl): benchmark one impl of one row, with the row's figures in extra_info."""

    def run(case: harness.Case, impl: harness.Impl) -> None:
        if impl.skip:
            pytest.skip(impl.skip)
        inputs = case.inputs()
        fn = impl.make(inputs)
        cuda = torch.cuda.is_available()

        def call():
            fn()
            if cuda:
                torch.cuda.synchronize()

        benchmark.extra_info.update(
            key=case.key, impl=impl.name, ours=impl.ours, formula=case.formula,
            bytes=impl.bytes if impl.bytes is not None else case.bytes,
            flops=impl.flops if impl.flops is not None else case.flops,
            label="GPU timing (host clock + synchronize)" if cuda else harness.CPU_LABEL,
        )  # fmt: skip
        benchmark.pedantic(call, setup=flush_l2, rounds=20 if cuda else 5, iterations=1, warmup_rounds=3)
        median = benchmark.stats.stats.median if benchmark.stats else None
        if median and benchmark.extra_info["bytes"]:
            benchmark.extra_info["tbps"] = benchmark.extra_info["bytes"] / median / 1e12
        if median and benchmark.extra_info["flops"]:
            benchmark.extra_info["tflops"] = benchmark.extra_info["flops"] / median / 1e12

    return run
